"""Self-test of the real-kernel test bed: the modules are there, IPVS works per namespace, and the seed's hand
configuration (ipip+fou tunnels, IPVS mh with direct routing, VIP on the backends' lo) carries client
connections over two backends with direct server return.  If these fail, the agent's kernel tests cannot
mean anything."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.addresses import vip
from tests.harness.echo import spread
from tests.harness.netns import Netns
from tests.harness.topology import Topology
from tests.harness.wait import wait_until

pytestmark = pytest.mark.kernel

VIP = vip(1)
N = 40


def nft_counters(ns: Netns, table: str) -> list[int]:
    """Packet counts of the counter rules of one nftables table, in rule order."""
    out = ns.run("nft", "list", "table", "ip", table).stdout
    return [int(n) for n in re.findall(r"counter packets (\d+) bytes", out)]


def watch_director(ns: Netns) -> None:
    """Count, before IPVS sees them, packets to the VIPs and packets *from* the VIPs (replies)."""
    ns.run("nft", "add", "table", "ip", "bedwatch")
    ns.run("nft", "add", "chain", "ip", "bedwatch", "pre",
           "{ type filter hook prerouting priority -300 ; policy accept ; }")
    ns.run("nft", "add", "rule", "ip", "bedwatch", "pre", "ip", "daddr", "198.51.100.0/24", "counter")
    ns.run("nft", "add", "rule", "ip", "bedwatch", "pre", "ip", "saddr", "198.51.100.0/24", "counter")


def test_modules_loaded() -> None:
    loaded = {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}
    for m in ("ip_vs", "ip_vs_mh", "ip_vs_rr", "fou", "ipip", "nf_conntrack", "veth", "bridge", "nf_tables"):
        assert m in loaded, f"{m} not loaded"


def test_ipvsadm_in_fresh_netns(netns: Callable[[str], Netns]) -> None:
    ns = netns("ipvs")
    out = ns.ipvsadm("-Ln")
    assert out.startswith("IP Virtual Server version"), out
    assert "->" in out and "TCP" not in out and "UDP" not in out, out  # empty table in a new namespace
    ns.ipvsadm("-A", "-t", f"{VIP}:80", "-s", "mh")
    assert f"TCP  {VIP}:80 mh" in ns.ipvsadm("-Ln")
    assert ns.run("ip", "fou", "add", "port", "5555", "ipproto", "4").returncode == 0


def seeded(topology: Callable[..., Topology], flags: tuple[str, ...] = ("mh-port",),
           directors: int = 1) -> Topology:
    topo: Topology = topology(directors=directors, backends=2, clients=1)
    for b in topo.backends:
        topo.seed_backend(b, [VIP])
    for d in topo.directors:
        topo.seed_director(d, [VIP], 80, flags=flags)
        watch_director(d)
    topo.serve(80)
    return topo


def test_seed_dsr_spreads_connections_over_two_backends(topology: Callable[..., Topology]) -> None:
    topo = seeded(topology)
    d = topo.directors[0]
    conns = topo.client.connect(VIP, 80, sports=range(40000, 40000 + N))

    by_backend = spread(conns)
    assert set(by_backend) == {"b1", "b2"}, by_backend
    assert sum(by_backend.values()) == N
    # the connections stay up and stay on their backend
    assert [c.ask() for c in conns] == [c.backend for c in conns]

    lines = [ln for ln in d.ipvsadm("-Lnc").splitlines() if ln.startswith("TCP")]
    assert len(lines) == N, lines
    # the kernel folds its per-CPU counters into these every 2 s
    stats = wait_until(lambda: (st := d.ipvs_stats(VIP, 80)).inpkts >= 3 * N and st, what="IPVS counters")
    assert stats.conns == N, stats
    assert stats.outpkts == 0, stats  # direct routing: IPVS never sees a reply
    to_vip, from_vip = nft_counters(d, "bedwatch")
    assert to_vip >= 3 * N
    assert from_vip == 0, "a reply from the VIP reached the director: not DSR"
    # the real servers saw the clients' own address (no SNAT anywhere)
    for b in topo.backends:
        established = b.run("ss", "-Htn", "state", "established", "(", "sport", "=", ":80", ")").stdout
        assert established.count(topo.client.address) == by_backend[b.label], established


def test_seed_without_mh_port_hashes_only_the_client_address(topology: Callable[..., Topology]) -> None:
    """The seed's exact `ipvsadm -A -t VIP:80 -s mh`: ip_vs_mh hashes the source address only, so every
    connection of one client goes to one backend (why the agent's default flags include mh-port)."""
    topo = seeded(topology, flags=())
    conns = topo.client.connect(VIP, 80, sports=range(41000, 41000 + N))
    assert len(spread(conns)) == 1, spread(conns)
    assert topo.directors[0].ipvs_stats(VIP, 80).outpkts == 0


def test_client_switches_director_and_connections_survive(topology: Callable[..., Topology]) -> None:
    """Two identically seeded directors pick the same backend for a flow (Maglev), so with sloppy_tcp a
    client whose route moves to the other director keeps its connections."""
    topo = seeded(topology, directors=2)
    d1, d2 = topo.directors
    for d in topo.directors:
        d.sysctl("net.ipv4.vs.sloppy_tcp", 1)
    conns = topo.client.connect(VIP, 80, sports=range(42000, 42000 + 20))
    assert len(spread(conns)) == 2, spread(conns)

    topo.client.via(d2)
    assert [c.ask() for c in conns] == [c.backend for c in conns]
    stats = wait_until(lambda: (st := d2.ipvs_stats(VIP, 80)).inpkts >= len(conns) and st, what="d2 counters")
    assert stats.outpkts == 0
    topo.client.via(d1)
    assert all(c.alive() for c in conns)


def test_udp_through_the_seed(topology: Callable[..., Topology]) -> None:
    topo = topology(directors=1, backends=2, clients=1)
    for b in topo.backends:
        topo.seed_backend(b, [VIP])
    topo.seed_director(topo.directors[0], [VIP], 53, flags=("mh-port",), proto="udp")
    topo.serve(53, proto="udp")
    answers = topo.client.udp(VIP, 53, sports=range(43000, 43000 + 20))
    assert set(answers) == {"b1", "b2"}, answers
    assert topo.directors[0].ipvs_stats(VIP, 53, proto="udp").outpkts == 0
