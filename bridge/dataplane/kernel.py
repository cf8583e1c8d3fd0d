"""The director's imperative shell: read owned kernel state and carry out operations, through pyroute2.

Ownership is decided here, at the edge, so the pure core never even sees foreign state: IPVS services
whose VIP lies in `vip_cidrs`, links named `<link_prefix><8 hex digits>`, routes with the agent's
route protocol number.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPVS, IPRoute, IPVSDest, IPVSService
from pyroute2.netlink.exceptions import NetlinkError

from bridge.addr import ipv4_int
from bridge.config import Config
from bridge.dataplane.ops import (
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
    VsKey,
)
from bridge.dataplane.state import LiveLink, LiveRealServer, LiveRoute, LiveService, LiveState

FLAG_BITS = {"mh-fallback": 0x0008, "mh-port": 0x0010}
PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}
PROTOCOL_NUMBERS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
FWD_DIRECT_ROUTING = 3
TABLES = {"main": 254, "local": 255}
TABLE_NAMES = {v: k for k, v in TABLES.items()}
IFF_UP = 0x1
RTN_UNICAST = 1
RTN_LOCAL = 2
SCOPE_LINK = 253
SCOPE_HOST = 254
TUNNEL_TTL = 64


class ApplyError(RuntimeError):
    """A failed operation, named, with the kernel's reason."""


@dataclass(frozen=True)
class OpResult:
    op: Op
    error: str | None


def _flag_names(bits: int) -> tuple[str, ...]:
    return tuple(sorted(name for name, bit in FLAG_BITS.items() if bits & bit))


def _flag_bits(flags: Iterable[str]) -> int:
    return sum(FLAG_BITS[f] for f in set(flags))


def _attrs(msg: Any, nla: str) -> dict[str, Any]:
    return dict(msg.get(nla)["attrs"])


class Kernel:
    """One netlink view of the kernel in the current network namespace."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._link_re = re.compile(rf"^{re.escape(config.link_prefix)}[0-9a-f]{{8}}$")
        self.ipr = IPRoute()
        self._ipvs: IPVS | None = None

    def close(self) -> None:
        self.ipr.close()
        if self._ipvs is not None:
            self._ipvs.close()

    @property
    def ipvs(self) -> IPVS:
        if self._ipvs is None:
            try:
                self._ipvs = IPVS()
            except (NetlinkError, OSError) as exc:
                raise ApplyError(f"IPVS is not available in this kernel (modprobe ip_vs ip_vs_mh): {exc}") from None
        return self._ipvs

    # ---- reading -------------------------------------------------------------------------------

    def _owned_vip(self, address: str) -> bool:
        try:
            return self.config.is_vip_allowed(ipv4_int(address))
        except ValueError:
            return False

    def read_services(self) -> tuple[LiveService, ...]:
        services = []
        for msg in self.ipvs.service("dump"):
            attrs = _attrs(msg, "IPVS_CMD_ATTR_SERVICE")
            if attrs.get("IPVS_SVC_ATTR_AF") != socket.AF_INET or ("IPVS_SVC_ATTR_FWMARK" in attrs and not attrs.get(
                "IPVS_SVC_ATTR_ADDR"
            )):
                continue
            vip = attrs.get("IPVS_SVC_ATTR_ADDR")
            protocol = PROTOCOLS.get(attrs.get("IPVS_SVC_ATTR_PROTOCOL", 0))
            if not vip or protocol is None or not self._owned_vip(vip):
                continue
            port = int(attrs["IPVS_SVC_ATTR_PORT"])
            key: VsKey = (vip, port, "udp" if protocol == "udp" else "tcp")
            services.append(
                LiveService(
                    vip=vip,
                    port=port,
                    protocol=key[2],
                    scheduler=str(attrs.get("IPVS_SVC_ATTR_SCHED_NAME", "")),
                    flags=_flag_names(int(attrs["IPVS_SVC_ATTR_FLAGS"]["flags"])),
                    real_servers=self._read_dests(key),
                )
            )
        return tuple(services)

    def _read_dests(self, key: VsKey) -> tuple[LiveRealServer, ...]:
        dests = []
        for msg in self.ipvs.dest("dump", service=_service_spec(key)):
            attrs = _attrs(msg, "IPVS_CMD_ATTR_DEST")
            dests.append(
                LiveRealServer(
                    address=str(attrs["IPVS_DEST_ATTR_ADDR"]),
                    port=int(attrs["IPVS_DEST_ATTR_PORT"]),
                    weight=int(attrs["IPVS_DEST_ATTR_WEIGHT"]),
                    active_conns=int(attrs.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0)),
                    inactive_conns=int(attrs.get("IPVS_DEST_ATTR_INACT_CONNS", 0)),
                )
            )
        return tuple(dests)

    def read_links(self) -> tuple[LiveLink, ...]:
        links = []
        for msg in self.ipr.get_links():
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

    def read_routes(self) -> tuple[LiveRoute, ...]:
        names = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in self.ipr.get_links()}
        routes = []
        for table in TABLES.values():
            for msg in self.ipr.get_routes(family=socket.AF_INET, table=table, proto=self.config.route_protocol):
                if msg["dst_len"] != 32 or msg["proto"] != self.config.route_protocol:
                    continue
                table_id = msg.get_attr("RTA_TABLE") or msg["table"]
                routes.append(
                    LiveRoute(
                        dst=str(msg.get_attr("RTA_DST")),
                        table=TABLE_NAMES.get(table_id, str(table_id)),
                        dev=str(names.get(msg.get_attr("RTA_OIF"), "")),
                    )
                )
        return tuple(sorted(set(routes), key=lambda r: (r.table, r.dst, r.dev)))

    def read(self) -> LiveState:
        return LiveState(self.read_services(), self.read_links(), self.read_routes())

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

    # ---- applying ------------------------------------------------------------------------------

    def _index(self, name: str) -> int:
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            raise ApplyError(f"no link named {name}")
        return int(found[0])

    def apply_one(self, op: Op) -> None:
        if isinstance(op, AddService | SetService):
            spec = _service_spec(op.key, op.scheduler, op.flags)
            self.ipvs.service("add" if isinstance(op, AddService) else "set", service=spec)
        elif isinstance(op, DelService):
            self.ipvs.service("del", service=_service_spec(op.key))
        elif isinstance(op, AddDest | SetDest):
            dest = IPVSDest(addr=op.address, port=op.port, weight=op.weight, fwd_method=FWD_DIRECT_ROUTING)
            self.ipvs.dest("add" if isinstance(op, AddDest) else "set", service=_service_spec(op.key), dest=dest)
        elif isinstance(op, DelDest):
            self.ipvs.dest("del", service=_service_spec(op.key), dest=IPVSDest(addr=op.address, port=op.port))
        elif isinstance(op, AddLink):
            t = op.tunnel
            self.ipr.link(
                "add", ifname=t.name, kind="ipip", ipip_local=t.local, ipip_remote=t.remote, ipip_ttl=TUNNEL_TTL,
                ipip_encap_type=1, ipip_encap_sport=0, ipip_encap_dport=t.fou_port,
            )
            self.ipr.link("set", index=self._index(t.name), state="up")
        elif isinstance(op, DelLink):
            self.ipr.link("del", index=self._index(op.name))
        elif isinstance(op, AddRoute | DelRoute):
            local = op.table == "local"
            self.ipr.route(
                "add" if isinstance(op, AddRoute) else "del",
                dst=op.dst, dst_len=32, oif=self._index(op.dev), table=TABLES[op.table],
                proto=self.config.route_protocol, type=RTN_LOCAL if local else RTN_UNICAST,
                scope=SCOPE_HOST if local else SCOPE_LINK,
            )

    def apply(self, ops: Iterable[Op]) -> Iterator[OpResult]:
        """Carry out every operation; a failure is reported and the rest still runs (the next pass
        retries whatever is still missing)."""
        for op in ops:
            try:
                self.apply_one(op)
            except (NetlinkError, OSError, ApplyError) as exc:
                yield OpResult(op, _reason(exc))
            else:
                yield OpResult(op, None)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, NetlinkError):
        return f"netlink error {exc.code}: {exc.args[1] if len(exc.args) > 1 else exc}"
    return str(exc)


def _service_spec(key: VsKey, scheduler: str = "mh", flags: Iterable[str] = ()) -> IPVSService:
    return IPVSService(
        addr=key[0], port=key[1], protocol=PROTOCOL_NUMBERS[key[2]], sched_name=scheduler,
        flags={"flags": _flag_bits(flags), "mask": 0xFFFF},
    )


@contextmanager
def open_kernel(config: Config) -> Iterator[Kernel]:
    kernel = Kernel(config)
    try:
        yield kernel
    finally:
        kernel.close()
