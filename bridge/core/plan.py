"""Desired state + live state + the agent's small memory -> the smallest ordered list of kernel operations.

Pure: no I/O, the clock comes in as `now`. Two things make this more than a set difference:

* ip_vs_mh fills its table by walking the real-server list head first, and the kernel inserts every
  new real server at the head. The list order is therefore part of the state. The desired order is
  reached by keeping the longest suffix of the desired list that the live list already holds in order
  and re-adding everything in front of it, tail first: the fewest delete/re-add steps there are.
* The kernel builds the table from each real server's last non-zero weight, which it never reports.
  The agent remembers it for the real servers at weight 0 (`last_weights`; any other's is its weight); a real
  server that must sit at weight 0 while remembering weight w is set to w and then to 0.

Anything that leaves the catalog is drained: weight 0 at once, deleted when its deadline passes. The
deadline is fixed when this director first notices, never moved by connection counters. The one exception is
the old encapsulation's real servers once the operator retires it (`retire_encapsulation`, `_retired`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from bridge.core.announce import Announcing, announcement_ops
from bridge.core.encap import Encapsulation, Forwarding, encapsulation_of
from bridge.core.filter import plan_filter
from bridge.core.keys import DestKey, ServiceKey
from bridge.core.live import LiveLink, LiveRealServer, LiveService, LiveState
from bridge.core.memory import Draining, Memory, last_weight, service_of
from bridge.core.model import DesiredState, RealServer, Tunnel, VirtualService
from bridge.core.ops import (
    AddDest,
    AddLink,
    AddRoute,
    AddService,
    DelDest,
    DelLink,
    DelRoute,
    DelService,
    Op,
    SetDest,
    SetService,
    SetSysctl,
    StartSyncDaemon,
    StopSyncDaemon,
)

ENCAP_FOU = 1


@dataclass(frozen=True)
class Plan:
    ops: tuple[Op, ...]
    drain_deadlines: Mapping[Draining, float]
    draining: tuple[str, ...]
    """Human-readable ids of what is draining now, with its deadline."""


@dataclass
class _Drains:
    """Deadlines being carried into the next pass; entries not touched this pass are forgotten."""

    old: Mapping[Draining, float]
    now: float
    timeout: float
    new: dict[Draining, float] = field(default_factory=dict)

    def expired(self, ident: Draining) -> bool:
        """Note that `ident` is draining; True once its deadline has passed."""
        deadline = self.old.get(ident, self.now + self.timeout)
        self.new[ident] = deadline  # kept even when expired, in case the deletion fails and is retried
        return deadline <= self.now


def _reachable_by_edits(desired: RealServer, live_last: int | None) -> bool:
    """Weight edits cannot give a real server a last_weight of 0 again; only a fresh add can. An unknown
    remembered weight (state file lost) is never assumed to be right."""
    if desired.last_weight == 0:
        return live_last == 0
    return True


def _edits(key: ServiceKey, desired: RealServer, live: LiveRealServer, live_last: int | None,
           forwarding: Forwarding) -> list[Op]:
    """Weight edits, each with the desired forwarding; a real server whose forwarding alone is wrong (another
    encapsulation, GUE port or checksum setting) is set in place: the kernel's SET_DEST edits the tunnel
    settings of a real server (ip_vs_ctl.c, __ip_vs_update_dest) and its connections use them from their
    next packet (ip_vs_xmit.c reads cp->dest's), so nothing is deleted and no connection is lost. `forwarding` is
    the director's; a standby real server has its own."""
    ops: list[Op] = []
    standby = desired.standby is not None
    forwarding = desired.standby or forwarding
    if desired.last_weight != live_last and desired.last_weight > 0:
        ops.append(SetDest(key, live.address, live.port, desired.last_weight, forwarding))
        if desired.weight != desired.last_weight:
            ops.append(SetDest(key, live.address, live.port, desired.weight, forwarding))
    elif desired.weight != live.weight or live.forwarding != forwarding:
        ops.append(SetDest(key, live.address, live.port, desired.weight, forwarding, standby))
    return ops


def _adds(key: ServiceKey, desired: RealServer, forwarding: Forwarding) -> list[Op]:
    forwarding = desired.standby or forwarding
    ops: list[Op] = [AddDest(key, desired.address, desired.port, desired.last_weight, forwarding,
                             desired.standby is not None)]
    if desired.weight != desired.last_weight:
        ops.append(SetDest(key, desired.address, desired.port, desired.weight, forwarding))
    return ops


def _kept_suffix(desired: tuple[RealServer, ...], candidates: list[LiveRealServer]) -> int:
    """Length of the longest suffix of `desired` that `candidates` (live order) hold as a subsequence."""
    kept = 0
    i = len(candidates) - 1
    for rs in reversed(desired):
        while i >= 0 and candidates[i].address != rs.address:
            i -= 1
        if i < 0:
            break
        kept += 1
        i -= 1
    return kept


def _orders(desired: tuple[RealServer, ...]) -> tuple[tuple[RealServer, ...], ...]:
    """The lists whose order the planner keeps: the director's own real servers, and apart from them the standby
    ones. A standby real server has no last weight, and ip_vs_mh skips such a one without touching the others'
    permutations, so where it sits among the director's own does not matter to the table: one is never deleted
    to be moved there (a deletion expires the synchronised connections bound to it), and a new one goes to the
    head. Among themselves they keep the desired order, so that the switch to their encapsulation, which gives
    them their weights where they are, finds them in it and re-adds nothing."""
    standby = tuple(rs for rs in desired if rs.standby is not None)
    if not standby:
        return (desired,)
    return tuple(rs for rs in desired if rs.standby is None), standby


def _wanted(rs: LiveRealServer, wanted: Mapping[str, RealServer]) -> bool:
    target = wanted.get(rs.address)
    return target is not None and target.port == rs.port


def _retired(leaving: list[LiveRealServer], retire: Encapsulation | None) -> set[str]:
    """The leaving real servers of the retired encapsulation, all of them or none: those of a virtual service go
    together once none holds a connection entry, active or inactive (the director's own and the synchronised
    ones). Deleting a real server expires every entry bound to it (expire_nodest_conn, Linux 5.9+), and an
    inactive one may be a half-closed connection whose client still acknowledges data (IPVS sees only the client's
    side: FIN_WAIT): its next packet would be scheduled afresh, maybe to another backend, which resets it. With no
    entry left the deletion ends nothing; all at once, the Maglev table changes once."""
    if retire is None:
        return set()
    retiring = [rs for rs in leaving if encapsulation_of(rs.forwarding) == retire]
    if any(rs.active_conns or rs.inactive_conns for rs in retiring):
        return set()
    return {rs.address for rs in retiring}


def plan_dests(
    key: ServiceKey,
    desired: tuple[RealServer, ...],
    live: tuple[LiveRealServer, ...],
    last_weights: Mapping[DestKey, int],
    drains: _Drains,
    forwarding: Forwarding,
    retire: Encapsulation | None = None,
) -> list[Op]:
    """A draining real server keeps the forwarding it has (a director moving from fou to gue drains its old
    real servers through their old tunnels); the desired ones get `forwarding`, a standby one its own.

    The real servers that stay or come get their weights before the leaving ones are set to 0: in the other
    order a director switching its encapsulation in place, whose every real server changes, would hold no
    weight at all between the two and drop new connections. Deletions come before the adds, which may re-add
    the same real server at its place in the list.

    The director's own real servers and the standby ones are each kept in their order, but not with respect to
    each other (`_orders`). The leaving ones of the `retire` encapsulation go before their deadline when
    `_retired` says so."""
    wanted = {rs.address: rs for rs in desired}
    deletes: list[Op] = []
    drain_edits: list[Op] = []
    candidates: list[LiveRealServer] = []
    retired = _retired([rs for rs in live if not _wanted(rs, wanted)], retire)
    for rs in live:
        if _wanted(rs, wanted):
            target = wanted[rs.address]
            if _reachable_by_edits(target, last_weight(key, rs, last_weights)):
                candidates.append(rs)
            else:
                deletes.append(DelDest(key, rs.address, rs.port))
        elif drains.expired(DestKey(key, rs.address, rs.port)) or rs.address in retired:
            deletes.append(DelDest(key, rs.address, rs.port))
        elif rs.weight != 0:
            drain_edits.append(SetDest(key, rs.address, rs.port, 0, rs.forwarding))
    kept_addresses: set[str] = set()
    for ordered in _orders(desired):
        kept = _kept_suffix(ordered, candidates)
        kept_addresses.update(rs.address for rs in ordered[len(ordered) - kept :])
    edits: list[Op] = []
    for rs in candidates:
        if rs.address in kept_addresses:
            edits.extend(_edits(key, wanted[rs.address], rs, last_weight(key, rs, last_weights), forwarding))
        else:
            deletes.append(DelDest(key, rs.address, rs.port))
    adds = [op for rs in reversed(desired) if rs.address not in kept_addresses for op in _adds(key, rs, forwarding)]
    return edits + deletes + adds + drain_edits


def _plan_services(
    desired: tuple[VirtualService, ...], live: tuple[LiveService, ...], memory: Memory, drains: _Drains,
    forwarding: Forwarding, retire: Encapsulation | None,
) -> tuple[list[Op], list[Op], list[Op], set[str]]:
    """Service-level ops (adds/sets first, deletions last), dest ops, and the VIPs still in use."""
    live_by_key = {s.key: s for s in live}
    first: list[Op] = []
    dests: list[Op] = []
    last: list[Op] = []
    vips_in_use: set[str] = set()
    for vs in desired:
        current = live_by_key.get(vs.key)
        vips_in_use.add(vs.vip)
        if current is None:
            first.append(AddService(vs.key, vs.scheduler, vs.flags))
        elif (current.scheduler, current.flags) != (vs.scheduler, vs.flags):
            first.append(SetService(vs.key, vs.scheduler, vs.flags))
        existing = current.real_servers if current else ()
        dests.extend(plan_dests(vs.key, vs.real_servers, existing, memory.last_weights, drains, forwarding, retire))
    wanted = {vs.key for vs in desired}
    for current in live:
        if current.key in wanted:
            continue
        if drains.expired(current.key):
            last.append(DelService(current.key))
            continue
        vips_in_use.add(current.vip)
        dests.extend(plan_dests(current.key, (), current.real_servers, memory.last_weights, drains, forwarding,
                                retire))
    return first, dests, last, vips_in_use


def _tunnel_matches(tunnel: Tunnel, link: LiveLink | None) -> bool:
    return (
        link is not None
        and link.kind == "ipip"
        and link.remote == tunnel.remote
        and link.local == tunnel.local
        and link.encap_type == ENCAP_FOU
        and link.encap_dport == tunnel.fou_port
        and link.up
    )


def _used_tunnels(
    desired: DesiredState, live: LiveState, kept_services: set[ServiceKey], deleted: set[tuple[ServiceKey, str]]
) -> tuple[Tunnel, ...]:
    """Tunnels of the desired state plus those still carrying draining real servers."""
    by_address = {t.tunnel_address: t for t in desired.tunnels}
    known_links = {link.name: link for link in live.links}
    extra: dict[str, Tunnel] = {}
    for svc in live.services:
        if svc.key not in kept_services:
            continue
        for rs in svc.real_servers:
            if rs.address in by_address or (svc.key, rs.address) in deleted:
                continue
            for route in live.routes:
                link = known_links.get(route.dev)
                if route.dst == rs.address and route.table == "main" and link is not None:
                    extra[link.name] = Tunnel(link.name, link.remote or "", link.local or "", rs.address,
                                              link.encap_dport)
    return desired.tunnels + tuple(extra[name] for name in sorted(extra))


def _by_text(item: tuple[Draining, float]) -> str:
    """Drains are listed in the order of their text, as they always were (a service before its real servers)."""
    return str(item[0])


def plan_sysctls(desired: DesiredState, live: LiveState) -> list[Op]:
    """Only the listed sysctls, each only when its value differs."""
    current = dict(live.sysctls)
    return [SetSysctl(name, value, current.get(name)) for name, value in desired.sysctls if current.get(name) != value]


def plan_sync_daemons(desired: DesiredState, live: LiveState) -> list[Op]:
    """Nothing at all unless connection sync is configured; a daemon with other settings is restarted."""
    if desired.sync_daemons is None:
        return []
    wanted = set(desired.sync_daemons)
    stops: list[Op] = [StopSyncDaemon(d) for d in live.sync_daemons if d not in wanted]
    return stops + [StartSyncDaemon(d) for d in desired.sync_daemons if d not in live.sync_daemons]


def plan(desired: DesiredState, live: LiveState, memory: Memory, now: float, drain_timeout: float,
         scope: frozenset[ServiceKey] | None = None, announce: Announcing | None = None) -> Plan:
    """The operations from `live` to `desired`. With a `scope`, only those virtual services are planned
    (`live` needs to hold only them, with every link and route): the small pass that follows one catalog
    change. A scoped plan adds missing links and routes but never deletes any, since it cannot see what the
    services outside it still use; deletions wait for the next full pass.

    With `announce` (a `bgp` section is configured), withdrawals come first and announcements last
    (bridge/core/announce.py says why). Sysctls and sync daemons come before the IPVS operations: a director must
    carry moved flows (sloppy_tcp) before it serves any. Filter operations (bridge/core/filter.py) come
    before the services too, and together: the shell sends them as one nftables transaction."""
    drains = _Drains(memory.drain_deadlines, now, drain_timeout)
    wanted_services = desired.virtual_services
    live_services = live.services
    if scope is not None:
        wanted_services = tuple(vs for vs in wanted_services if vs.key in scope)
        live_services = tuple(s for s in live_services if s.key in scope)
    first, dests, last, vips = _plan_services(wanted_services, live_services, memory, drains, desired.forwarding,
                                              desired.retire)
    deleted_services = {op.key for op in last if isinstance(op, DelService)}
    kept_services = {s.key for s in live_services} - deleted_services
    deleted = {(op.key, op.address) for op in dests if isinstance(op, DelDest)}
    tunnels = _used_tunnels(desired, live, kept_services, deleted)

    links = {link.name: link for link in live.links}
    link_ops: list[Op] = []
    for tunnel in tunnels:
        if not _tunnel_matches(tunnel, links.get(tunnel.name)):
            if tunnel.name in links:
                link_ops.append(DelLink(tunnel.name))
            link_ops.append(AddLink(tunnel))
    rebuilt = {op.tunnel.name for op in link_ops if isinstance(op, AddLink)}
    wanted_routes = {(t.tunnel_address, "main", t.name) for t in tunnels}
    wanted_routes |= {(vip, "local", "lo") for vip in vips}
    live_routes = {(r.dst, r.table, r.dev) for r in live.routes}
    route_adds: list[Op] = [
        AddRoute(dst, table, dev)
        for dst, table, dev in sorted(wanted_routes)
        if (dst, table, dev) not in live_routes or dev in rebuilt
    ]
    deadlines = dict(drains.new)
    route_dels: list[Op] = []
    link_dels: list[Op] = []
    if scope is None:
        route_dels = [DelRoute(dst, table, dev) for dst, table, dev in sorted(live_routes - wanted_routes)]
        tunnel_names = {t.name for t in tunnels}
        link_dels = [DelLink(link.name) for link in live.links if link.name not in tunnel_names]
    else:
        deadlines.update((k, v) for k, v in memory.drain_deadlines.items() if service_of(k) not in scope)
    withdraws, announces = announcement_ops(announce, live.announced) if announce else ([], [])
    filters = plan_filter(wanted_services, live.filter, kept_services, scope)
    ops = [*withdraws, *plan_sysctls(desired, live), *plan_sync_daemons(desired, live), *link_ops, *route_adds,
           *filters, *first, *dests, *last, *route_dels, *link_dels, *announces]
    draining = tuple(f"{ident} until {deadline:.0f}" for ident, deadline in sorted(deadlines.items(), key=_by_text)
                     if deadline > now)
    return Plan(tuple(ops), deadlines, draining)
