"""The director's packet filter: the agent's own nftables table, read through libnftables' JSON API and
changed by one nf_tables netlink transaction per pass (bridge/dataplane/nft_netlink.py says why libnftables
does not write it).

Reading with libnftables (Debian's python3-nftables, a thin ctypes wrapper of libnftables.so.1) rather than
pyroute2: it turns a table into plain JSON (interval sets back into prefixes, comments, counters) exactly as
`nft list` shows it to an operator. python3-nftables is not on PyPI; the project's virtualenv gets that one
package, and nothing else of the system's, through scripts/venv-nftables.sh (make venv).

Ownership: everything lives in `table inet maglev_bridge`; the agent never lists, flushes or changes any
other table, so an operator's tables and iptables-nft rules are never touched. Inside its table, names say
what belongs to which virtual service (`allow_<vip hex>_<proto>_<port>` for the set, `drop_...` for the
counter) and the rule's comment names the service's VIP:port/protocol. IPv6 VIPs get their rules and sets in
the same table (`meta nfproto ipv6 ip6 daddr ... ip6 saddr != @allow_<32 hex digits>_...`).

Where the chain sits: a base chain on the input hook at priority `filter` (0). IPVS takes packets on
NF_INET_LOCAL_IN at NF_IP_PRI_NAT_SRC - 2 and - 1 (98 and 99, net/netfilter/ipvs/ip_vs_core.c), so this
chain sees every packet to a VIP before IPVS schedules it, and a drop here is final. An accept here (the
chain's policy) decides nothing: an operator's drop in another table still drops.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from bridge.core.addr import ip_value
from bridge.core.allow import Network
from bridge.core.keys import ServiceKey
from bridge.core.live import LiveAllow, LiveFilter
from bridge.core.ops import CreateFilter, FilterOp
from bridge.dataplane.nft_netlink import NftSocket, TransactionError, messages

FAMILY = "inet"
TABLE = "maglev_bridge"
CHAIN = "input"
COMMENT = "maglev-bridge"
_OWNER = {"family": FAMILY, "table": TABLE}


class FilterError(RuntimeError):
    """libnftables is missing, cannot list the table, or the kernel refused a transaction; the message says which."""


def object_id(key: ServiceKey) -> str:
    """Reversible, and short enough for nftables' names (at most 255 bytes): the VIP as 8 hex digits (IPv4)
    or 32 (IPv6)."""
    family, value = ip_value(key.vip)
    return f"{value:0{8 if family == 4 else 32}x}_{key.protocol}_{key.port}"


def _key(object_id: str) -> ServiceKey | None:
    vip, _, rest = object_id.partition("_")
    protocol, _, port = rest.partition("_")
    if len(vip) not in (8, 32) or protocol not in ("tcp", "udp") or not port.isdigit():
        return None
    try:
        value = int(vip, 16)
        address = str(ipaddress.IPv4Address(value) if len(vip) == 8 else ipaddress.IPv6Address(value))
    except ValueError:
        return None
    return ServiceKey(address, int(port), "udp" if protocol == "udp" else "tcp")


def _prefixes(elements: Iterable[Any]) -> tuple[str, ...]:
    """The set's elements as the agent writes them: a host prefix (/32, /128) comes back as a bare address, a
    range that is no prefix (written by someone else) as the prefixes covering it. A set holds one family."""
    found: list[Network] = []
    for element in elements:
        if isinstance(element, str):
            found.append(ipaddress.ip_network(element))
        elif "prefix" in element:
            found.append(ipaddress.ip_network(f"{element['prefix']['addr']}/{element['prefix']['len']}"))
        elif "range" in element:
            low, high = (ipaddress.ip_address(a) for a in element["range"])
            found.extend(ipaddress.summarize_address_range(low, high))
    return tuple(str(n) for n in sorted(found))


def parse_table(listing: Iterable[dict[str, Any]]) -> LiveFilter:
    """`list table inet maglev_bridge` (JSON objects) as plain data. Rules are the agent's when their comment
    is; sets and counters when their names are."""
    table = chain = False
    sets: dict[ServiceKey, tuple[str, ...]] = {}
    counters: dict[ServiceKey, int] = {}
    rules: dict[ServiceKey, int] = {}
    for item in listing:
        if "table" in item:
            table = True
        elif "chain" in item and item["chain"].get("name") == CHAIN:
            chain = True
        elif "set" in item and (key := _key(item["set"]["name"].removeprefix("allow_"))):
            sets[key] = _prefixes(item["set"].get("elem", ()))
        elif "counter" in item and (key := _key(item["counter"]["name"].removeprefix("drop_"))):
            counters[key] = int(item["counter"].get("packets", 0))
        elif "rule" in item and item["rule"].get("chain") == CHAIN:
            key = _comment_key(str(item["rule"].get("comment", "")))
            if key is not None:
                rules[key] = int(item["rule"]["handle"])
    keys = sorted(sets.keys() | rules.keys() | counters.keys(), key=ServiceKey.listing_order)
    allows = tuple(LiveAllow(key, sets.get(key), rules.get(key), key in counters, counters.get(key, 0))
                   for key in keys)
    return LiveFilter(table and chain, allows)


def _comment_key(comment: str) -> ServiceKey | None:
    """`maglev-bridge 198.51.100.10:80/tcp` -> that key; None for any other comment."""
    prefix = COMMENT + " "
    if not comment.startswith(prefix):
        return None
    try:
        return ServiceKey.parse(comment.removeprefix(prefix))
    except ValueError:
        return None


class Nft:
    """One libnftables context for reading and one netfilter netlink socket for writing. Built at first use:
    a director with no allow list never needs the library."""

    def __init__(self) -> None:
        try:
            import nftables  # Debian's python3-nftables (see above)
        except ImportError as exc:
            raise FilterError(f"python3-nftables is not available ({exc}); run `make venv` "
                              "(scripts/venv-nftables.sh)") from None
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(True)
        self._socket: NftSocket | None = None

    def close(self) -> None:
        """The netlink socket; libnftables frees its context, and the socket it holds, with the object."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def read(self) -> LiveFilter:
        rc, output, error = self._nft.json_cmd({"nftables": [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]})
        if rc != 0:
            if "No such file or directory" in str(error):
                return LiveFilter()
            raise FilterError(" ".join(str(error).split()) or f"libnftables returned {rc}")
        return parse_table(output.get("nftables", ()) if isinstance(output, dict) else ())

    def transaction(self, ops: Iterable[FilterOp]) -> dict[ServiceKey, int]:
        """Every operation in one kernel transaction: all of them take effect, or none (FilterError naming
        the operation the kernel refused). Returns the handle of each rule it added, by service."""
        requests, owners = [], []
        for op in ops:
            ident, label = ("", "") if isinstance(op, CreateFilter) else (object_id(op.key), str(op.key))
            for request in messages(op, TABLE, CHAIN, COMMENT, ident, label):
                requests.append(request)
                owners.append(op)
        if not requests:
            return {}
        if self._socket is None:
            self._socket = NftSocket()
        try:
            handles = self._socket.transaction(requests)
        except TransactionError as exc:
            refused = "the commit" if exc.index is None else owners[exc.index].describe()
            raise FilterError(f"{refused}: {exc} (the transaction changed nothing)") from None
        return {key: handle for comment, handle in handles.items() if (key := _comment_key(comment)) is not None}
