"""The backend role: make this node accept FOU- or GUE-encapsulated traffic for the VIPs its instances claim
and answer the clients directly (DSR).

Replaces the seed's hand configuration: a fou receive port for ipip (`ip fou add port 5555 ipproto 4`), a GUE
one (`ip fou add port 6080 gue`) in `gue` mode, both during a migration (`receive: [fou, gue]`), `tunl0` up,
reverse-path filtering relaxed only where the tunnel needs it, each claimed VIP as a /32 on `lo` (labelled,
so the agent knows its own), and ARP settings that stop this node from answering ARP for a VIP.

Both receivers hand the inner IPv4 packet to the same place: fou's GUE receive path returns the GUE header's
protocol (IPPROTO_IPIP) to the IP layer, which resubmits the packet to the ipip handler (net/ipv4/fou_core.c,
gue_udp_recv; ip_local_deliver_finish's resubmit), so it arrives on `tunl0` exactly as a FOU-received one:
the same rp_filter setting serves both.

A backend whose own (Consul) address is IPv6 is reached by GUE over IPv6 (`gue` mode only): it gets a GUE
receive port over IPv6 too (`ip fou add port 6080 gue -6`, an IPv6-only socket beside the IPv4 one), and fou
hands the inner IPv6 packet to ip6_tunnel, which takes a packet from any remote only on its fallback device
`ip6tnl0`, only while that is up, and only when its mode takes IPv6 inside (ip6ip6, as the module creates it, or
any: ipxip6_rcv drops `tproto != ipproto && tproto != 0`). The agent brings it up (the module creates it down)
but never changes its mode, which every other user of the device shares: a mode that takes no IPv6 is a
conflict naming the fix. It needs no rp_filter setting: the inner packets are IPv6 (an IPv4 VIP's claim by an
instance with an IPv6 address is refused), and IPv6 has no reverse-path filter.

An IPv6 VIP goes on `lo` as a /128 with `nodad` (duplicate address detection would hold it tentative, and
unusable, for a second; every backend holds the same VIP by design) and, since IPv6 addresses carry no
label, the agent's route protocol number as the address's protocol (IFA_PROTO, Linux 5.18) marks it as
the agent's. No sysctl is needed for IPv6: Linux answers a neighbour solicitation only for an address of the
interface it arrived on (ndisc_recv_ns looks the target up strictly on that device), so a VIP on `lo` is
never advertised on the node's other links (tests/kernel/test_ipv6.py proves it).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from bridge.core.addr import canonical_ip, ip_value
from bridge.core.config import Config
from bridge.core.encap import Encapsulation
from bridge.dataplane.fou import FOU_ENCAP_GUE, IPPROTO_IPIP, Fou

TUNNEL_LINK = "tunl0"
SIT_LINK = "sit0"
"""Where a GUE packet carrying IPv6 ends up: the GUE header names IPPROTO_IPV6, which the sit module handles
(ipip6_rcv), and it takes a packet from any remote only on its fallback device, and only while that is up."""
IP6TNL_LINK = "ip6tnl0"
"""Where GUE over IPv6 ends up: ip6_tunnel's fallback device."""
IP6TNL_MODES = {socket.IPPROTO_IPV6: "ip6ip6", 0: "any", socket.IPPROTO_IPIP: "ipip6"}
"""The device's inner protocol (IFLA_IP6TNL_PROTO) by the name `ip -6 tunnel` gives it."""
IP6TNL_TAKES_IPV6 = frozenset({socket.IPPROTO_IPV6, 0})
IFA_F_NODAD = 0x02
SYSCTL_ROOT = Path("/proc/sys")


@dataclass(frozen=True)
class BackendLive:
    vips: tuple[str, ...]
    fou_ports: Mapping[int, str] | None
    """port -> what the kernel's fou receiver on it takes: `gue`, `ipip` (FOU for ipip) or `ipproto N`; None
    when the kernel has no fou module loaded."""
    tunnel_up: bool | None
    """None when tunl0 does not exist (the ipip module is not loaded)."""
    sysctls: Mapping[str, int]
    """net/ipv4/conf/<if>/{rp_filter,arp_ignore,arp_announce}, keyed "<if>/<key>"."""
    sit_up: bool | None = None
    """None when sit0 does not exist (the sit module is not loaded); needed for IPv6 VIPs in gue mode."""
    fou6_ports: Mapping[int, str] = field(default_factory=dict)
    """As `fou_ports`, of the receivers over IPv6 (`ip fou add ... -6`)."""
    ip6tnl: tuple[bool, int] | None = None
    """(up, inner protocol: 0 any, 4 ipip6 or 41 ip6ip6) of ip6tnl0; None when it does not exist (ip6_tunnel not
    loaded)."""


@dataclass(frozen=True)
class BackendOp:
    kind: str
    target: str
    value: int = 0

    def describe(self) -> str:
        if self.kind == "sysctl":
            return f"set net.ipv4.conf.{self.target.replace('/', '.')} = {self.value}"
        return f"{self.kind} {self.target}" + (" over IPv6" if self.value == 6 else "")


def vip_label(config: Config) -> str:
    return f"lo:{config.link_prefix}"


def _conf(interface: str, key: str) -> str:
    """Keyed as a path below net/ipv4/conf: interface names may contain dots (eth0.100)."""
    return f"{interface}/{key}"


def _sysctl_ops(sysctls: Mapping[str, int], tunnels: tuple[str, ...]) -> list[BackendOp]:
    """rp_filter off on the tunnel devices; since the kernel uses max(all, interface), lowering `all` first
    raises every other interface to the old `all` value, so their effective filtering does not change."""
    ops: list[BackendOp] = []
    for tunnel in tunnels:
        if sysctls.get(_conf(tunnel, "rp_filter"), 0) != 0:
            ops.append(BackendOp("sysctl", _conf(tunnel, "rp_filter"), 0))
    all_rp = sysctls.get(_conf("all", "rp_filter"), 0)
    if all_rp:
        for name, value in sorted(sysctls.items()):
            interface, _, key = name.rpartition("/")
            if key != "rp_filter" or interface == "all" or interface in tunnels or value >= all_rp:
                continue
            ops.append(BackendOp("sysctl", name, all_rp))
        ops.append(BackendOp("sysctl", _conf("all", "rp_filter"), 0))
    for key, wanted in (("arp_ignore", 1), ("arp_announce", 2)):
        if sysctls.get(_conf("all", key), 0) < wanted:
            ops.append(BackendOp("sysctl", _conf("all", key), wanted))
    return ops


RECEIVES: dict[Encapsulation, str] = {"fou": "ipip", "gue": "gue"}


def receivers(config: Config) -> tuple[tuple[Encapsulation, int], ...]:
    """The receive ports this node must have: `receive` (or the fleet's `encapsulation`) with its port."""
    ports: dict[Encapsulation, int] = {"fou": config.fou_port, "gue": config.gue_port}
    return tuple((kind, ports[kind]) for kind in config.receivers)


def _receiver_ops(wanted: Iterable[tuple[Encapsulation, int]], live: Mapping[int, str],
                  family: int = 4) -> list[BackendOp]:
    """A missing receiver is added; a port that receives something else is a conflict, never changed: it
    may be another tool's, and one UDP port is either FOU or GUE."""
    ops: list[BackendOp] = []
    over = " over IPv6" if family == 6 else ""
    for kind, port in wanted:
        found = live.get(port)
        if found is None:
            ops.append(BackendOp(f"add {kind} port", str(port), family if family == 6 else 0))
        elif found != RECEIVES[kind]:
            ops.append(BackendOp("conflict", f"fou port {port}{over} receives {found}, not {RECEIVES[kind]} "
                                             f"({kind} needs its own port)"))
    return ops


def plan_backend(vips: Iterable[str], live: BackendLive, receive: Iterable[tuple[Encapsulation, int]],
                 underlays: frozenset[int] = frozenset({4})) -> list[BackendOp]:
    """Pure: what to change so this node receives its VIPs through the `receive` receivers (kind, port) over
    the `underlays`, the families of its instances' addresses: with 6, GUE over IPv6 too (through ip6tnl0);
    with 4, IPv6 VIPs come by GUE over IPv4 (through sit0)."""
    receive = tuple(receive)
    gue = any(kind == "gue" for kind, _ in receive)
    gue6 = gue and 6 in underlays
    ops: list[BackendOp] = []
    if live.fou_ports is None:
        ops.append(BackendOp("conflict", "the kernel has no fou support: load the fou module (modprobe fou)"))
    else:
        ops.extend(_receiver_ops(receive, live.fou_ports))
        if gue6:
            ops.extend(_receiver_ops([(k, p) for k, p in receive if k == "gue"], live.fou6_ports, 6))
            ops.extend(_ip6tnl_ops(live.ip6tnl))
    if live.tunnel_up is None:
        ops.append(BackendOp("conflict", f"{TUNNEL_LINK} is missing: load the ipip module (modprobe ipip)"))
    elif not live.tunnel_up:
        ops.append(BackendOp("link up", TUNNEL_LINK))
    wanted = set(vips)
    if gue and 4 in underlays and any(":" in vip for vip in wanted):
        ops.extend(_sit_ops(live.sit_up))
    ops.extend(_sysctl_ops(live.sysctls, (TUNNEL_LINK,)))
    ops.extend(BackendOp("add vip", vip) for vip in sorted(wanted - set(live.vips), key=ip_value))
    ops.extend(BackendOp("delete vip", vip) for vip in sorted(set(live.vips) - wanted, key=ip_value))
    return ops


def _sit_ops(sit_up: bool | None) -> list[BackendOp]:
    """IPv6 VIPs over GUE arrive through sit0 (no reverse-path filter applies to IPv6 there)."""
    if sit_up is None:
        return [BackendOp("conflict", f"{SIT_LINK} is missing: load the sit module (modprobe sit); GUE hands "
                                      "IPv6 packets to it")]
    return [] if sit_up else [BackendOp("link up", SIT_LINK)]


def _ip6tnl_ops(ip6tnl: tuple[bool, int] | None) -> list[BackendOp]:
    """GUE over IPv6 arrives through ip6tnl0, which must be up and take IPv6 inside. Its mode is shared by
    every user of the device, so one that takes no IPv6 is a conflict, never changed."""
    if ip6tnl is None:
        return [BackendOp("conflict", f"{IP6TNL_LINK} is missing: load the ip6_tunnel module (modprobe ip6_tunnel); "
                                      "GUE over IPv6 hands its packets to it")]
    up, proto = ip6tnl
    ops = [] if up else [BackendOp("link up", IP6TNL_LINK)]
    if proto not in IP6TNL_TAKES_IPV6:
        mode = IP6TNL_MODES.get(proto, f"protocol {proto}")
        ops.append(BackendOp("conflict", f"{IP6TNL_LINK} is in mode {mode}, which takes no IPv6 packets, and GUE "
                                         f"over IPv6 hands it IPv6 ones: ip -6 tunnel change {IP6TNL_LINK} mode "
                                         "ip6ip6"))
    return ops


class BackendKernel:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.ipr = IPRoute()

    def close(self) -> None:
        self.ipr.close()

    def _lo(self) -> int:
        return int(self.ipr.link_lookup(ifname="lo")[0])

    def _owned_vips(self) -> Iterator[str]:
        """IPv4 VIPs by their label on lo, IPv6 ones by their address protocol."""
        label = vip_label(self.config)
        for a in self.ipr.get_addr(family=socket.AF_INET, index=self._lo()):
            if a.get_attr("IFA_LABEL") == label and a["prefixlen"] == 32:
                yield str(a.get_attr("IFA_ADDRESS"))
        for a in self.ipr.get_addr(family=socket.AF_INET6, index=self._lo()):
            if a.get_attr("IFA_PROTO") == self.config.route_protocol and a["prefixlen"] == 128:
                yield canonical_ip(str(a.get_attr("IFA_ADDRESS")))

    def read(self) -> BackendLive:
        vips = tuple(sorted(self._owned_vips(), key=ip_value))
        ports6: dict[int, str] = {}
        try:
            with Fou() as fou:
                found = fou.ports()
            ports: dict[int, str] | None = {p.port: _receives(p.encap_type, p.ipproto) for p in found
                                            if p.family == socket.AF_INET}
            ports6 = {p.port: _receives(p.encap_type, p.ipproto) for p in found if p.family == socket.AF_INET6}
        except (NetlinkError, OSError):
            ports = None
        return BackendLive(vips, ports, self._up(TUNNEL_LINK), dict(_read_sysctls()), self._up(SIT_LINK),
                           ports6, self._ip6tnl())

    def _ip6tnl(self) -> tuple[bool, int] | None:
        found = self.ipr.link_lookup(ifname=IP6TNL_LINK)
        if not found:
            return None
        link = self.ipr.get_links(found[0])[0]
        data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
        return bool(link["flags"] & 1), int(data.get_attr("IFLA_IP6TNL_PROTO") or 0)

    def _up(self, name: str) -> bool | None:
        found = self.ipr.link_lookup(ifname=name)
        return bool(self.ipr.get_links(found[0])[0]["flags"] & 1) if found else None

    def apply(self, ops: Iterable[BackendOp]) -> Iterator[tuple[BackendOp, str | None]]:
        for op in ops:
            try:
                self._apply_one(op)
            except (NetlinkError, OSError, RuntimeError) as exc:
                yield op, str(exc)
            else:
                yield op, None

    def _apply_one(self, op: BackendOp) -> None:
        if op.kind in ("add fou port", "add gue port"):
            with Fou() as fou:
                fou.add(int(op.target), gue=op.kind == "add gue port",
                        family=socket.AF_INET6 if op.value == 6 else socket.AF_INET)
        elif op.kind == "link up":
            self.ipr.link("set", index=self.ipr.link_lookup(ifname=op.target)[0], state="up")
        elif op.kind == "sysctl":
            (SYSCTL_ROOT / "net/ipv4/conf" / op.target).write_text(f"{op.value}\n")
        elif op.kind in ("add vip", "delete vip") and ":" in op.target:
            self.ipr.addr("add" if op.kind == "add vip" else "del", index=self._lo(), address=op.target,
                          prefixlen=128, flags=IFA_F_NODAD, proto=self.config.route_protocol)
        elif op.kind in ("add vip", "delete vip"):
            self.ipr.addr(
                "add" if op.kind == "add vip" else "del",
                index=self._lo(), address=op.target, prefixlen=32, label=vip_label(self.config),
            )
        else:
            raise RuntimeError(op.target)


def _receives(encap_type: int, ipproto: int) -> str:
    if encap_type == FOU_ENCAP_GUE:
        return "gue"
    return "ipip" if ipproto == IPPROTO_IPIP else f"ipproto {ipproto}"


def _read_sysctls() -> Iterator[tuple[str, int]]:
    conf = SYSCTL_ROOT / "net/ipv4/conf"
    for interface in sorted(p.name for p in conf.iterdir()):
        if interface == "default":
            continue
        for key in ("rp_filter", "arp_ignore", "arp_announce"):
            try:
                yield _conf(interface, key), int((conf / interface / key).read_text())
            except (OSError, ValueError):
                continue
