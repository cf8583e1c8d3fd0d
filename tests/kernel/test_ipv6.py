"""IPv6 VIPs on a real kernel, the parts that do not depend on the encapsulation: IPVS services of family
AF_INET6 through the agent's own netlink code, the VIP's local and announce routes, the nftables filter of an
IPv6 VIP, and the backend role's VIP on `lo` (nodad) that no other interface answers neighbour solicitations
for. Witnesses: `ipvsadm -Ln`, `ip -6 route`, `nft list table`, the packets' counters and the neighbour's
neighbour table.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest

from bridge.core.config import BgpConfig, Config
from bridge.core.keys import ServiceKey
from bridge.core.ops import (
    AddAllow,
    AddDest,
    AddRoute,
    AddService,
    Announce,
    ChangeAllow,
    CreateFilter,
    DelDest,
    DelRoute,
    DelService,
    Op,
    SetDest,
    Withdraw,
)
from bridge.dataplane.backend import BackendKernel, plan_backend
from bridge.dataplane.kernel import Kernel
from tests.harness.netns import Netns
from tests.harness.wait import wait_until

pytestmark = pytest.mark.kernel

VIP6 = "2001:db8:10::10"
CONFIG = Config(vip_cidrs=(ipaddress.IPv4Network("198.51.100.0/24"), ipaddress.IPv6Network("2001:db8:10::/64")),
                node_name="b1")
WEB6 = ServiceKey(VIP6, 80, "tcp")
DNS6 = ServiceKey(VIP6, 53, "udp")
WEB4 = ServiceKey("198.51.100.10", 80, "tcp")
ANNOUNCE_TABLE = 245


@contextmanager
def kernel_in(ns: Netns, config: Config = CONFIG) -> Iterator[Kernel]:
    """A director's Kernel in `ns`: the thread stays there, since the Kernel opens some sockets (routes,
    nftables) at first use."""
    with ns.entered():
        kernel = Kernel(config)
        try:
            yield kernel
        finally:
            kernel.close()


def applied(kernel: Kernel, ops: list[Op]) -> None:
    failed = [(r.op.describe(), r.error) for r in kernel.apply(ops) if r.error]
    assert not failed, failed


def test_ipvs_services_of_both_families_are_created_read_back_changed_and_deleted(netns: Callable[[str], Netns]):
    ns = netns("v6ipvs")
    # IPVS refuses an IPv4 real server it has no route to (inet_addr_type); IPv6 ones it does not look up
    ns.ip_batch(["link set lo up", "link add dummy0 type dummy", "link set dummy0 up",
                 "route add 203.0.113.0/24 dev dummy0"])
    with kernel_in(ns) as kernel:
        applied(kernel, [
            AddService(WEB6, "mh", ("mh-fallback", "mh-port")), AddService(DNS6, "mh", ("mh-port",)),
            AddService(WEB4, "mh", ()),
            AddDest(WEB6, "2001:db8:20::1", 80, 3), AddDest(WEB6, "2001:db8:20::2", 80, 1),
            AddDest(DNS6, "2001:db8:20::1", 53, 1), AddDest(WEB4, "203.0.113.11", 80, 1),
        ])
        listing = ns.ipvsadm("-Ln")
        assert "[2001:db8:10::10]:80 mh" in listing and "-> [2001:db8:20::2]:80" in listing
        services = {s.key: s for s in kernel.read_services()}
        assert set(services) == {WEB6, DNS6, WEB4}
        assert [(d.address, d.port, d.weight) for d in services[WEB6].real_servers] == [
            ("2001:db8:20::2", 80, 1), ("2001:db8:20::1", 80, 3)], "kernel list order: newest first"
        assert services[WEB6].flags == ("mh-fallback", "mh-port")
        assert [s.key for s in kernel.read_services(scope={DNS6})] == [DNS6], "one small request, not a dump"

        applied(kernel, [SetDest(WEB6, "2001:db8:20::1", 80, 0), DelDest(WEB6, "2001:db8:20::2", 80),
                         DelService(DNS6)])
        services = {s.key: s for s in kernel.read_services()}
        assert set(services) == {WEB6, WEB4}
        assert [(d.address, d.weight) for d in services[WEB6].real_servers] == [("2001:db8:20::1", 0)]
        applied(kernel, [DelService(WEB6), DelService(WEB4)])
        assert kernel.read_services() == ()
        assert "2001:db8" not in ns.ipvsadm("-Ln")


def test_an_ipv6_service_outside_vip_cidrs_is_not_read_as_the_agents(netns: Callable[[str], Netns]):
    ns = netns("v6own")
    ns.run("ipvsadm", "-A", "-t", "[2001:db8:99::1]:80", "-s", "rr")
    with kernel_in(ns) as kernel:
        assert kernel.read_services() == ()
    assert "[2001:db8:99::1]:80" in ns.ipvsadm("-Ln")


def test_ipv6_vip_routes_and_announcements_are_host_routes_of_the_agents_protocol(netns: Callable[[str], Netns]):
    ns = netns("v6route")
    ns.ip_batch(["link set lo up", f"route add blackhole 2001:db8:10::99/128 table {ANNOUNCE_TABLE} proto 12"])
    config = replace(CONFIG, bgp=BgpConfig(table=ANNOUNCE_TABLE))
    with kernel_in(ns, config) as kernel:
        applied(kernel, [AddRoute(VIP6, "local", "lo"), AddRoute("198.51.100.10", "local", "lo"),
                         Announce(VIP6, ANNOUNCE_TABLE)])
        assert {(r.dst, r.table, r.dev) for r in kernel.read().routes} == {
            (VIP6, "local", "lo"), ("198.51.100.10", "local", "lo")}
        assert kernel.read_announced() == (VIP6,), "the route of protocol 12 is someone else's"
        assert re.search(r"local 2001:db8:10::10 dev lo proto 245", ns.ip("-6", "route", "show", "table", "local")
                         .stdout)
        applied(kernel, [Withdraw(VIP6, ANNOUNCE_TABLE), DelRoute(VIP6, "local", "lo")])
        assert kernel.read_announced() == ()
        assert {r.dst for r in kernel.read().routes} == {"198.51.100.10"}
    assert "2001:db8:10::99" in ns.ip("-6", "route", "show", "table", str(ANNOUNCE_TABLE)).stdout


DIRECTOR_MAC, CLIENT_MAC = "02:00:00:00:06:01", "02:00:00:00:06:02"


def _pair(director: Netns, client: Netns) -> None:
    """director eth0 2001:db8:1::1 <-> client eth0 2001:db8:1::2, neighbours fixed, the VIP routed to the
    director, which holds it as a local route."""
    director.ip_batch([
        "link set lo up",
        f"link add eth0 address {DIRECTOR_MAC} type veth peer name eth0 address {CLIENT_MAC} netns {client.name}",
        "link set eth0 up", "addr add 2001:db8:1::1/64 dev eth0 nodad",
        f"neigh replace 2001:db8:1::2 lladdr {CLIENT_MAC} dev eth0 nud permanent",
        "route add 2001:db8:4::/48 via 2001:db8:1::2",
    ])
    client.ip_batch([
        "link set lo up", "link set eth0 up", "addr add 2001:db8:1::2/64 dev eth0 nodad",
        "addr add 2001:db8:4:1::5/128 dev lo nodad", "addr add 2001:db8:4:2::5/128 dev lo nodad",
        f"neigh replace 2001:db8:1::1 lladdr {DIRECTOR_MAC} dev eth0 nud permanent",
        "route add 2001:db8:10::/64 via 2001:db8:1::1",
    ])


def _send(client: Netns, source: str, port: int, count: int = 1) -> None:
    with client.entered():
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with s:
        s.bind((source, 0))
        for _ in range(count):
            s.sendto(b"?", (VIP6, port))


def test_the_filter_of_an_ipv6_vip_drops_every_source_outside_its_list_and_only_those(netns: Callable[[str], Netns]):
    director, client = netns("v6nftd"), netns("v6nftc")
    _pair(director, client)
    with kernel_in(director) as kernel:
        applied(kernel, [AddRoute(VIP6, "local", "lo"), CreateFilter(),
                         AddAllow(DNS6, ("2001:db8:4:1::/64", "2001:db8:5::/48")),
                         AddAllow(ServiceKey("198.51.100.10", 53, "udp"), ("192.0.2.0/24",))])
        table = director.run("nft", "list", "table", "inet", "maglev_bridge").stdout
        assert re.search(r"ip6 daddr 2001:db8:10::10 udp dport 53 ip6 saddr != "
                         r"@allow_20010db8001000000000000000000010_udp_53 counter name", table), table
        assert 'comment "maglev-bridge [2001:db8:10::10]:53/udp"' in table
        allows = {e.key: e for e in kernel.read_filter().allows}
        assert allows[DNS6].prefixes == ("2001:db8:4:1::/64", "2001:db8:5::/48") and allows[DNS6].rule

        _send(client, "2001:db8:4:2::5", 53, 3)
        wait_until(lambda: {e.key: e for e in kernel.read_filter().allows}[DNS6].drops == 3,
                   what="3 datagrams from outside the list dropped")
        _send(client, "2001:db8:4:1::5", 53, 2)
        udp = director.run("nft", "list", "ruleset").stdout
        assert {e.key: e for e in kernel.read_filter().allows}[DNS6].drops == 3, udp

        applied(kernel, [ChangeAllow(DNS6, ("2001:db8:4::/48",), ("2001:db8:4:1::/64", "2001:db8:5::/48"))])
        assert {e.key: e for e in kernel.read_filter().allows}[DNS6].prefixes == ("2001:db8:4::/48",)
        _send(client, "2001:db8:4:2::5", 53, 1)
        assert {e.key: e for e in kernel.read_filter().allows}[DNS6].drops == 3, "the new list admits it"


VIP6_HEX = "0x20010db8001000000000000000000010"
"""The VIP as nftables matches 128 raw bits: the target of a neighbour solicitation or advertisement sits
at bits 64-191 of the ICMPv6 message."""


def test_the_backend_holds_an_ipv6_vip_on_lo_and_no_interface_answers_solicitations_for_it(
        netns: Callable[[str], Netns]):
    """A neighbour that believes the VIP is on the link (its route says so) and knows the backend's MAC probes
    it with unicast solicitations (NUD), which reach the backend's stack (a multicast one would not even be
    received: eth0 joins no solicited-node group for an address of lo). None is answered; the same address on
    eth0 is (the control, which also proves the counter)."""
    backend, neighbour = netns("v6be"), netns("v6nb")
    backend.ip_batch([
        "link set lo up",
        f"link add eth0 address {DIRECTOR_MAC} type veth peer name eth0 address {CLIENT_MAC} netns {neighbour.name}",
        "link set eth0 up", "addr add 2001:db8:1::1/64 dev eth0 nodad",
    ])
    neighbour.ip_batch(["link set lo up", "link set eth0 up", "addr add 2001:db8:1::2/64 dev eth0 nodad",
                        f"route add {VIP6}/128 dev eth0"])
    backend.run("nft", "-f", "-", input=f"""table inet ndp {{
        chain inbound {{
            type filter hook input priority 0;
            icmpv6 type nd-neighbor-solicit @th,64,128 {VIP6_HEX} counter
        }}
        chain outbound {{
            type filter hook output priority 0;
            icmpv6 type nd-neighbor-advert @th,64,128 {VIP6_HEX} counter
        }}
    }}""")
    with backend.entered():
        be = BackendKernel(replace(CONFIG, role="backend"))
    try:
        live = be.read()
        ops = [op for op in plan_backend([VIP6, "198.51.100.10"], live, CONFIG.fou_port) if "vip" in op.kind]
        failed = [(op.describe(), error) for op, error in be.apply(ops) if error]
        assert not failed, failed
        assert be.read().vips == ("198.51.100.10", VIP6)
        shown = backend.ip("-6", "addr", "show", "dev", "lo").stdout
        assert re.search(r"inet6 2001:db8:10::10/128 .*nodad", shown), shown
        backend.ip("-6", "addr", "add", "2001:db8:10::77/128", "dev", "lo")  # an operator's: not ours
        assert be.read().vips == ("198.51.100.10", VIP6)

        def counters() -> list[int]:
            listing = backend.run("nft", "list", "table", "inet", "ndp").stdout
            return [int(n) for n in re.findall(r"counter packets (\d+)", listing)]

        def probed() -> list[int] | None:
            """One datagram to the VIP (which makes the neighbour probe it); the counters once 3 probes came."""
            with neighbour.entered():
                s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            with s:
                s.sendto(b"?", (VIP6, 9))
            seen = counters()
            return seen if seen[0] >= 3 else None

        neighbour.ip("neigh", "replace", VIP6, "lladdr", DIRECTOR_MAC, "dev", "eth0", "nud", "stale")
        solicited, advertised = wait_until(probed, timeout=90, what="three solicitations for the VIP at the backend")
        assert advertised == 0, f"the backend advertised the VIP it holds on lo ({solicited} solicitations)"
        assert "lladdr" not in neighbour.ip("-6", "neigh", "show", VIP6).stdout

        backend.ip("-6", "addr", "add", f"{VIP6}/128", "dev", "eth0", "nodad")  # control
        neighbour.ip("neigh", "replace", VIP6, "lladdr", DIRECTOR_MAC, "dev", "eth0", "nud", "stale")
        wait_until(lambda: probed() is not None and counters()[1] >= 1, timeout=90,
                   what="the VIP on eth0 advertised (control)")
        backend.ip("-6", "addr", "del", f"{VIP6}/128", "dev", "eth0")

        ops = plan_backend([], be.read(), CONFIG.fou_port)
        failed = [(op.describe(), error) for op, error in be.apply([op for op in ops if "vip" in op.kind]) if error]
        assert not failed, failed
        assert be.read().vips == ()
        assert "2001:db8:10::77" in backend.ip("-6", "addr", "show", "dev", "lo").stdout
    finally:
        be.close()
