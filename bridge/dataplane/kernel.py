"""The director's imperative shell: read owned kernel state and carry out operations, through pyroute2.

Ownership is decided here, at the edge, so the pure core never even sees foreign state: IPVS services
whose VIP lies in `vip_cidrs`, links named `<link_prefix><8 hex digits>`, routes with the agent's
route protocol number.
"""

from __future__ import annotations

import errno
import re
import socket
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from bridge.core.addr import canonical_ip, ip_value
from bridge.core.config import Config
from bridge.core.encap import mtu_problem
from bridge.core.keys import Protocol, ServiceKey
from bridge.core.live import LiveFilter, LiveLink, LiveRealServer, LiveRoute, LiveService, LiveState
from bridge.core.ops import (
    AddDest,
    AddLink,
    AddRoute,
    AddService,
    Announce,
    DelLink,
    DelRoute,
    DelService,
    FilterOp,
    IpvsOp,
    Op,
    OpResult,
    SetDest,
    SetService,
    SetSysctl,
    StartSyncDaemon,
    StopSyncDaemon,
    Withdraw,
)
from bridge.dataplane.errors import ApplyError
from bridge.dataplane.ipvs_netlink import (
    CMD_DEL_DEST,
    CMD_DEL_SERVICE,
    CMD_NEW_DEST,
    CMD_NEW_SERVICE,
    CMD_SET_DEST,
    CMD_SET_SERVICE,
    IpvsNetlink,
    Request,
    ServiceRecord,
    WireKey,
    address_family,
)
from bridge.dataplane.netlink_batch import NLM_F_CREATE, NLM_F_EXCL, BatchSocket, attr, describe, u32
from bridge.dataplane.nft import FilterError, Nft

FLAG_BITS = {"mh-fallback": 0x0008, "mh-port": 0x0010}
PROTOCOLS: dict[int, Protocol] = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}
PROTOCOL_NUMBERS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
TABLES = {"main": 254, "local": 255}
TABLE_NAMES = {v: k for k, v in TABLES.items()}
IFF_UP = 0x1
RTN_UNICAST = 1
RTN_LOCAL = 2
RTN_BLACKHOLE = 6
SCOPE_LINK = 253
SCOPE_HOST = 254
TUNNEL_TTL = 64
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
HOST_LENGTHS: dict[int, int] = {socket.AF_INET: 32, socket.AF_INET6: 128}


def _flag_names(bits: int) -> tuple[str, ...]:
    return tuple(sorted(name for name, bit in FLAG_BITS.items() if bits & bit))


def _flag_bits(flags: Iterable[str]) -> int:
    return sum(FLAG_BITS[f] for f in set(flags))


class Kernel:
    """One netlink view of the kernel in the current network namespace."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._link_re = re.compile(rf"^{re.escape(config.link_prefix)}[0-9a-f]{{8}}$")
        self.ipr = IPRoute()
        self._ipvs: IpvsNetlink | None = None
        self._routes: BatchSocket | None = None
        self._nft: Nft | None = None
        self.rule_handles: dict[ServiceKey, int] = {}
        """The handles of the filter rules the last nftables transaction added, by service."""

    def close(self) -> None:
        self.ipr.close()
        for sock in (self._ipvs, self._routes):
            if sock is not None:
                sock.close()
        if self._nft is not None:
            self._nft.close()
            self._nft = None

    @property
    def ipvs(self) -> IpvsNetlink:
        if self._ipvs is None:
            try:
                self._ipvs = IpvsNetlink()
            except (NetlinkError, OSError) as exc:
                raise ApplyError(f"IPVS is not available in this kernel (modprobe ip_vs ip_vs_mh): {exc}") from None
        return self._ipvs

    @property
    def nft(self) -> Nft:
        if self._nft is None:
            self._nft = Nft()
        return self._nft

    # ---- reading -------------------------------------------------------------------------------

    def _owned_vip(self, address: str) -> bool:
        try:
            return self.config.is_vip_allowed(ip_value(address))
        except ValueError:
            return False

    def read_services(self, scope: Iterable[ServiceKey] | None = None) -> tuple[LiveService, ...]:
        """Every owned IPVS service, or only those of `scope` (one small request each, not a dump)."""
        if scope is None:
            records: Iterable[ServiceRecord | None] = self.ipvs.services()
        else:
            records = [self.ipvs.service(_wire(k)) for k in sorted(scope)]
        services = []
        for record in records:
            protocol = PROTOCOLS.get(record.key.protocol) if record else None
            if record is None or protocol is None or not self._owned_vip(record.key.address):
                continue
            dests = tuple(
                LiveRealServer(d.address, d.port, d.weight, d.active_conns, d.inactive_conns, d.stats, d.forwarding)
                for d in self.ipvs.dests(record.key)
            )
            services.append(LiveService(record.key.address, record.key.port, protocol, record.scheduler,
                                        _flag_names(record.flags), dests))
        return tuple(services)

    def _parse_links(self, link_msgs: list[Any]) -> tuple[LiveLink, ...]:
        links = []
        for msg in link_msgs:
            name = msg.get_attr("IFLA_IFNAME")
            if not name or not self._link_re.match(name):
                continue
            info = msg.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info else None
            data = info.get_attr("IFLA_INFO_DATA") if info else None

            def field(attr: str, data: Any = data) -> Any:
                return data.get_attr(attr) if data is not None else None

            links.append(
                LiveLink(
                    name=name,
                    kind=str(kind or ""),
                    remote=field("IFLA_IPIP_REMOTE"),
                    local=field("IFLA_IPIP_LOCAL"),
                    encap_type=int(field("IFLA_IPIP_ENCAP_TYPE") or 0),
                    encap_dport=int(field("IFLA_IPIP_ENCAP_DPORT") or 0),
                    up=bool(msg["flags"] & IFF_UP),
                )
            )
        return tuple(sorted(links, key=lambda link: link.name))

    def _host_routes(self, table: int) -> Iterator[Any]:
        """The agent's host routes (/32 and /128, its protocol number) in `table`, of both families."""
        for family, length in HOST_LENGTHS.items():
            for msg in self.ipr.get_routes(family=family, table=table, proto=self.config.route_protocol):
                if msg["dst_len"] == length and msg["proto"] == self.config.route_protocol and (
                        msg.get_attr("RTA_TABLE") or msg["table"]) == table:
                    yield msg

    def _parse_routes(self, link_msgs: list[Any]) -> tuple[LiveRoute, ...]:
        names = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in link_msgs}
        routes = [
            LiveRoute(dst=canonical_ip(str(msg.get_attr("RTA_DST"))), table=TABLE_NAMES[table],
                      dev=str(names.get(msg.get_attr("RTA_OIF"), "")))
            for table in TABLES.values() for msg in self._host_routes(table)
        ]
        return tuple(sorted(set(routes), key=lambda r: (r.table, r.dst, r.dev)))

    def read(self, services: bool = True, filter_table: bool = True) -> LiveState:
        """Owned state; `services=False` skips IPVS (for shadow mode and status on a kernel without it), and
        `filter_table=False` the nftables table (KernelView keeps its copy when a pass did not change it:
        listing 2,000 sets costs 0.6-1.7 s). Links are dumped once for both the tunnels and the route device
        names."""
        link_msgs = list(self.ipr.get_links())
        ipvs = self.read_services() if services else ()
        daemons = tuple(self.ipvs.daemons()) if services and self.config.conn_sync is not None else ()
        return LiveState(ipvs, self._parse_links(link_msgs), self._parse_routes(link_msgs), self.read_sysctls(),
                         self.read_announced(), daemons, self.read_filter() if filter_table else LiveFilter())

    def read_filter(self) -> LiveFilter:
        """The agent's nftables table, on a director. Without python3-nftables it reads as absent: a director
        with no allow list then works as before, and one with a list gets the library's absence as the
        error of its filter operations, every pass, rather than a crash. A table libnftables cannot list is
        an ApplyError like any other unreadable kernel state, so `status`, `apply` and the agent's pass
        report it in one line instead of a traceback."""
        if self.config.role != "director":
            return LiveFilter()
        try:
            nft = self.nft
        except FilterError:
            return LiveFilter()
        try:
            return nft.read()
        except FilterError as exc:
            raise ApplyError(f"cannot read nftables table inet maglev_bridge: {exc}") from None

    def read_sysctls(self) -> tuple[tuple[str, int | None], ...]:
        """The listed sysctls of this network namespace (/proc/sys/net is per namespace: the reading
        thread's), and only those; none on a backend, which the director's list is not for."""
        if self.config.role != "director":
            return ()
        values: list[tuple[str, int | None]] = []
        for name, _ in self.config.sysctls:
            try:
                values.append((name, int(_sysctl_path(name).read_text().strip())))
            except (OSError, ValueError):
                values.append((name, None))
        return tuple(values)

    def read_announced(self) -> tuple[str, ...]:
        """VIPs announced by this agent: host routes (/32, /128) of its protocol in the announce table. Routes of
        any other protocol there are someone else's and never read as ours."""
        if self.config.bgp is None:
            return ()
        found = {canonical_ip(str(msg.get_attr("RTA_DST"))) for msg in self._host_routes(self.config.bgp.table)}
        return tuple(sorted(found, key=ip_value))

    def default_local_address(self) -> str:
        """The underlay source address: the one on the interface holding the default route."""
        for route in self.ipr.get_default_routes(family=socket.AF_INET, table=TABLES["main"]):
            prefsrc = route.get_attr("RTA_PREFSRC")
            if prefsrc:
                return str(prefsrc)
            oif = route.get_attr("RTA_OIF")
            for addr in self.ipr.get_addr(family=socket.AF_INET, index=oif):
                return str(addr.get_attr("IFA_ADDRESS"))
        raise ApplyError("local_address is not set and there is no IPv4 default route to derive it from")

    def mtu_warning(self, local_address: str, ipv6_backend: str | None = None) -> str | None:
        """Whether the underlay interface (the one holding the tunnel source address) can carry full-size
        packets in this director's encapsulation; the warning when it cannot. With an `ipv6_backend` (a `gue`
        director with IPv6 real servers) also the interface of the route to it, for GUE over IPv6 (+52 bytes):
        IPVS takes the outer source and interface of such a packet from that route (it has no source setting
        of its own), and one lookup per full pass keeps the check's cost independent of the fleet's size."""
        warnings = [self._mtu_of_address(local_address)]
        if ipv6_backend is not None:
            warnings.append(self._mtu_towards(ipv6_backend))
        found = [w for w in warnings if w]
        return "; ".join(found) if found else None

    def _mtu_of_address(self, local_address: str) -> str | None:
        for addr in self.ipr.get_addr(family=socket.AF_INET, address=local_address):
            link = self.ipr.get_links(addr["index"])[0]
            return mtu_problem(self.config.encapsulation, str(link.get_attr("IFLA_IFNAME")),
                               int(link.get_attr("IFLA_MTU")))
        return None

    def _mtu_towards(self, address: str) -> str | None:
        try:
            routes = self.ipr.route("get", dst=address)
        except NetlinkError:
            return None  # no route: the real server is unreachable, which the traffic, not the MTU, shows
        for route in routes:
            link = self.ipr.get_links(route.get_attr("RTA_OIF"))[0]
            return mtu_problem(self.config.encapsulation, str(link.get_attr("IFLA_IFNAME")),
                               int(link.get_attr("IFLA_MTU")), outer=6)
        return None

    # ---- applying ------------------------------------------------------------------------------

    def _index(self, name: str) -> int:
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            raise ApplyError(f"no link named {name}")
        return int(found[0])

    def apply_one(self, op: Op) -> None:
        """Links, through pyroute2 (IPVS and route operations go in batches, see `apply`)."""
        if isinstance(op, AddLink):
            t = op.tunnel
            self.ipr.link(
                "add", ifname=t.name, kind="ipip", ipip_local=t.local, ipip_remote=t.remote, ipip_ttl=TUNNEL_TTL,
                ipip_encap_type=1, ipip_encap_sport=0, ipip_encap_dport=t.fou_port,
            )
            self.ipr.link("set", index=self._index(t.name), state="up")
        elif isinstance(op, DelLink):
            self.ipr.link("del", index=self._index(op.name))
        elif isinstance(op, SetSysctl):
            _sysctl_path(op.name).write_text(f"{op.value}\n")
        elif isinstance(op, StartSyncDaemon | StopSyncDaemon):
            error = self.ipvs.daemon(isinstance(op, StartSyncDaemon), op.daemon)
            if error:
                raise ApplyError(error)

    def apply(self, ops: Iterable[Op]) -> Iterator[OpResult]:
        """Carry out every operation in order; a failure is reported and the rest still runs (the next
        pass retries whatever is still missing). Consecutive IPVS or route operations go in batches."""
        pending: list[Op] = []
        pending_kind: str | None = None
        for op in ops:
            kind = _batch_kind(op)
            if pending and kind != pending_kind:
                yield from self._flush(pending)
                pending = []
            if kind is not None:
                pending.append(op)
                pending_kind = kind
                continue
            try:
                self.apply_one(op)
            except (NetlinkError, OSError, ApplyError) as exc:
                yield OpResult(op, _reason(exc))
            else:
                yield OpResult(op, None)
        yield from self._flush(pending)

    def _flush(self, ops: list[Op]) -> Iterator[OpResult]:
        if not ops:
            return
        try:
            if _batch_kind(ops[0]) == "ipvs":
                errors = self.ipvs.run(_ipvs_request(op) for op in ops if isinstance(op, IpvsOp))
            elif _batch_kind(ops[0]) == "nft":
                self.rule_handles = self.nft.transaction(op for op in ops if isinstance(op, FilterOp))
                errors = [None] * len(ops)
            else:
                indexes = {msg.get_attr("IFLA_IFNAME"): msg["index"] for msg in self.ipr.get_links()}
                errors = self.routes.run([self._announce_request(op) if isinstance(op, Announce | Withdraw)
                                          else self._route_request(op, indexes) for op in ops
                                          if isinstance(op, AddRoute | DelRoute | Announce | Withdraw)])
                errors = [None if isinstance(op, Withdraw) and error == GONE else error
                          for op, error in zip(ops, errors, strict=True)]
        except (OSError, ApplyError, FilterError, KeyError) as exc:
            errors = [_reason(exc)] * len(ops)
        for op, error in zip(ops, errors, strict=True):
            yield OpResult(op, error)

    @property
    def routes(self) -> BatchSocket:
        if self._routes is None:
            self._routes = BatchSocket(socket.NETLINK_ROUTE)
        return self._routes

    def _route_request(self, op: AddRoute | DelRoute, indexes: dict[str, int]) -> tuple[int, int, bytes]:
        if op.dev not in indexes:
            raise ApplyError(f"no link named {op.dev}")
        local = op.table == "local"
        table = TABLES[op.table]
        family, length, dst = _host_dst(op.dst)
        scope = 0 if family == socket.AF_INET6 else SCOPE_HOST if local else SCOPE_LINK  # IPv6 routes have none
        header = struct.pack("=BBBBBBBBI", family, length, 0, 0, table, self.config.route_protocol, scope,
                             RTN_LOCAL if local else RTN_UNICAST, 0)
        body = header + dst + u32(RTA_OIF, indexes[op.dev]) + u32(RTA_TABLE, table)
        if isinstance(op, AddRoute):
            return RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body
        return RTM_DELROUTE, 0, body


    def _announce_request(self, op: Announce | Withdraw) -> tuple[int, int, bytes]:
        """A blackhole /32 (/128) in the announce table: BIRD learns it and exports it with itself as next hop; it
        needs no device and forwards nothing. A withdrawal deletes only a route of the agent's protocol."""
        table = op.table
        family, length, dst = _host_dst(op.vip)
        header = struct.pack("=BBBBBBBBI", family, length, 0, 0, table, self.config.route_protocol, 0,
                             RTN_BLACKHOLE if isinstance(op, Announce) else 0, 0)
        body = header + dst + u32(RTA_TABLE, table)
        if isinstance(op, Announce):
            return RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body
        return RTM_DELROUTE, 0, body


GONE = describe(errno.ESRCH)
"""A withdrawal of a route already gone has done what it was for: `maintenance on` deletes the announcements
itself, and a pass that began before the agent saw the file still plans their withdrawal."""


def _host_dst(address: str) -> tuple[int, int, bytes]:
    """(family, prefix length, RTA_DST attribute) of a host route to `address`."""
    family = address_family(address)
    return family, HOST_LENGTHS[family], attr(RTA_DST, socket.inet_pton(family, address))


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys", *name.split("."))


def _batch_kind(op: Op) -> str | None:
    if isinstance(op, IpvsOp):
        return "ipvs"
    if isinstance(op, AddRoute | DelRoute | Announce | Withdraw):
        return "route"
    if isinstance(op, FilterOp):
        return "nft"
    return None


@lru_cache(maxsize=4096)
def _wire(key: ServiceKey) -> WireKey:
    """Cached: an apply names each service again in the operation of each of its real servers."""
    return WireKey(key.vip, key.port, PROTOCOL_NUMBERS[key.protocol])


def _ipvs_request(op: IpvsOp) -> Request:
    key = _wire(op.key)
    if isinstance(op, AddService | SetService):
        cmd = CMD_NEW_SERVICE if isinstance(op, AddService) else CMD_SET_SERVICE
        return Request(cmd, key, op.scheduler, _flag_bits(op.flags))
    if isinstance(op, DelService):
        return Request(CMD_DEL_SERVICE, key)
    if isinstance(op, AddDest | SetDest):
        return Request(CMD_NEW_DEST if isinstance(op, AddDest) else CMD_SET_DEST, key, dest=(op.address, op.port),
                       weight=op.weight, forwarding=op.forwarding)
    return Request(CMD_DEL_DEST, key, dest=(op.address, op.port))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, NetlinkError):
        return f"netlink error {exc.code}: {exc.args[1] if len(exc.args) > 1 else exc}"
    return str(exc)


@contextmanager
def open_kernel(config: Config) -> Iterator[Kernel]:
    kernel = Kernel(config)
    try:
        yield kernel
    finally:
        kernel.close()
