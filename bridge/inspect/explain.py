"""`explain`: which backend this director's kernel picks for a flow, and why, from the Maglev model.

Works from the live kernel (what this director does now) or from the desired state of a catalog (what
every director should do). The kernel never reports a real server's remembered weight; where live
state forces a guess, the explanation says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bridge.core.addr import bracketed, canonical_ip, ip_value, split_host_port
from bridge.core.allow import AllowList, admits, describe
from bridge.core.keys import ServiceKey
from bridge.core.maglev import Choice, Dest, MaglevTable, address_key, build_table, fingerprint, lookup, shares
from bridge.inspect.errors import ExplainError


@dataclass(frozen=True)
class ServiceView:
    """One virtual service as the model needs it, with where its real servers lead."""

    label: str
    flags: tuple[str, ...]
    dests: tuple[Dest, ...]
    backends: dict[str, str] = field(default_factory=dict)
    """real-server address -> backend (underlay) address, where known."""
    assumed: tuple[str, ...] = ()
    """Real servers whose remembered weight had to be assumed."""
    source: str = "live kernel state"
    allow: AllowList = None
    """The service's allow list (None: everyone)."""
    service: str = ""


def parse_service(text: str) -> ServiceKey:
    """The virtual service `explain` is asked about; the protocol may be left out (tcp)."""
    try:
        return ServiceKey.parse(text, default_protocol="tcp")
    except ValueError as exc:
        raise ExplainError(str(exc)) from None


CLIENT_FORM = "<client-ip>[:<port>] (IPv6: [<client-ip>]:<port>, or the address alone)"


def parse_client(text: str, key: ServiceKey) -> tuple[str, int]:
    """The client address (canonical) and source port (0 when left out) of a flow to `key`. An IPv6 client
    may be written without brackets when it has no port. A client of the other family than the VIP is
    refused: its packets can never reach that virtual service."""
    try:
        host, colon, port = ("", "", "") if text.count(":") > 1 and not text.startswith("[") else (
            split_host_port(text))
        client = canonical_ip(host or text)
    except ValueError:
        raise ExplainError(f"{text!r}: expected {CLIENT_FORM}") from None
    if colon and not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ExplainError(f"{text!r}: port {port!r} is not a number from 0 to 65535")
    if ip_value(client).family != key.family:
        raise ExplainError(f"client {client} is IPv{ip_value(client).family} and {key} is IPv{key.family}: "
                           "its packets can never reach that virtual service")
    return client, int(port) if colon else 0


def _name(view: ServiceView, dest: Dest) -> str:
    backend = view.backends.get(dest.address)
    via = f" (backend {backend})" if backend else ""
    state = "" if dest.available else f", unavailable: weight 0, remembers {dest.last_weight}"
    return f"{bracketed(dest.address)}:{dest.port}{via}{state}"


def explain_flow(view: ServiceView, client: str, port: int, size: int) -> tuple[list[str], Choice | None]:
    table = build_table(view.dests, size)
    mh_port, mh_fallback = "mh-port" in view.flags, "mh-fallback" in view.flags
    lines = [f"{view.label}  flags {','.join(view.flags) or '-'}  table {size} slots  ({view.source})",
             f"client {bracketed(client)}:{port}"
             + ("" if mh_port else "  (no mh-port: the source port is not hashed)")]
    filtered = not admits(view.allow, client)
    if filtered:
        lines.append(f"source {client} is not in {view.service or view.label}'s allow list "
                     f"({describe(view.allow)}): the filter drops it before IPVS; Maglev would choose:")
    choice = lookup(table, client, port, mh_port=mh_port, mh_fallback=mh_fallback)
    first = _first_slot(table, client, port if mh_port else 0)
    owner = int(table.slots[first])
    if owner < 0:
        lines.append(f"slot {first} is empty (no real server has weight): the kernel drops the flow")
        return lines, None
    lines.append(f"slot {first} -> {_name(view, table.dests[owner])}")
    if choice is None:
        why = "no mh-fallback" if not mh_fallback else "no real server is available"
        lines.append(f"=> dropped ({why})")
    else:
        if choice.fallback_hops:
            lines.append(f"mh-fallback: {choice.fallback_hops} re-hash(es), ending at slot {choice.slot}")
        lines.append(f"=> {_name(view, table.dests[choice.dest_index])}")
    if filtered:
        lines.append(f"=> dropped by the filter (table inet maglev_bridge), source {client}")
        choice = None
    lines.extend(_assumptions(view))
    return lines, choice


def _first_slot(table: MaglevTable, client: str, port: int) -> int:
    from bridge.core.maglev import HASH1_KEY, hash_input, hsiphash_u32

    return int(hsiphash_u32(hash_input(address_key(client), port), HASH1_KEY) % table.size)


def _assumptions(view: ServiceView) -> list[str]:
    if not view.assumed:
        return []
    return [f"note: the kernel does not report remembered weights; assumed 0 for {', '.join(view.assumed)} "
            "(this agent has no record of them)"]


def explain_shares(view: ServiceView, size: int) -> list[str]:
    table = build_table(view.dests, size)
    lines = [f"{view.label}  table {size} slots  fingerprint {fingerprint(table)}  ({view.source})",
             f"{'REAL SERVER':<24} {'WEIGHT':>7} {'SLOTS':>6} {'TABLE':>8} {'WEIGHT%':>8} {'GAP':>8}"]
    worst: tuple[float, str] | None = None
    for share in shares(table):
        d = share.dest
        gap = share.distortion
        gap_text = "-" if gap is None else f"{gap:+.1%}"
        lines.append(f"{bracketed(d.address) + ':' + str(d.port):<24} {d.last_weight:>7} {share.slots:>6} "
                     f"{share.slot_share:>8.2%} {share.weight_share:>8.2%} {gap_text:>8}")
        if gap is not None and (worst is None or abs(gap) > abs(worst[0])):
            worst = (gap, d.address)
    if worst is not None:
        lines.append(f"worst gap: {worst[1]} gets {worst[0]:+.1%} of its weight's share "
                     "(table size and the kernel's weight shifting)")
    lines.extend(_assumptions(view))
    return lines
