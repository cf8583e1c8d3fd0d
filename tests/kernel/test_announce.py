"""The director's sysctls, its announce table and maintenance, on a real kernel, with `maglev-bridge run` as a
real process. The routers' view of IPv4 VIPs (BIRD, ECMP) is tests/kernel/test_failover.py; here the witnesses
are `ip route show table 245`, sysctl and ipvsadm, and for IPv6 VIPs the router of tests/harness/router_bed.py
(the examples' BIRD configurations)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.harness.addresses import VIP6_NET, VIP_NET, vip, vip6
from tests.harness.agent import AgentHarness
from tests.harness.echo import spread
from tests.harness.failover import RoutedAgents
from tests.harness.router_bed import CALM_BFD, RouterBed, RouteWatcher, watching
from tests.harness.wait import wait_until

pytestmark = pytest.mark.kernel
TABLE = 245
SPORTS = range(42000, 42020)


def announced(director) -> list[str]:
    """VIPs with an announce route of the agent's protocol (245), by `ip`, the independent witness (which fails
    with "FIB table does not exist" until the table's first route)."""
    out = director.ip("-4", "route", "show", "table", str(TABLE), "proto", "245", check=False).stdout
    return re.findall(r"^blackhole ([\d.]+)", out, re.M)


def health(director) -> tuple[int, dict]:
    with director.entered():
        try:
            with urllib.request.urlopen("http://127.0.0.1:9119/health", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        except OSError:
            return 0, {}


def build(topology, **config):
    topo = topology(directors=1, backends=2, clients=1)
    agent = AgentHarness(topo, **config)
    agent.config_overrides["bgp"] = {"table": TABLE, "maintenance_file": str(agent.dir / "maintenance")}
    for b in topo.backends:
        agent.instance("web", b)
    topo.serve(80)
    agent.apply_backends()
    return topo, agent


def test_the_agent_sets_its_sysctls_repairs_drift_and_never_touches_an_unlisted_one(topology):
    topo, agent = build(topology)
    d = topo.directors[0]
    assert d.sysctl("net.ipv4.vs.sloppy_tcp") == 0, "a fresh namespace starts without it"
    d.sysctl("net.ipv4.vs.expire_quiescent_template", 1)
    d.sysctl("net.ipv4.vs.conntrack", 1)
    out = agent.apply(d)
    assert "set sysctl net.ipv4.vs.sloppy_tcp = 1 (was 0)  ok" in out
    assert "set sysctl net.ipv4.vs.expire_nodest_conn = 1 (was 0)  ok" in out
    assert (d.sysctl("net.ipv4.vs.sloppy_tcp"), d.sysctl("net.ipv4.vs.expire_nodest_conn")) == (1, 1)
    assert (d.sysctl("net.ipv4.vs.expire_quiescent_template"), d.sysctl("net.ipv4.vs.conntrack")) == (1, 1)
    d.sysctl("net.ipv4.vs.sloppy_tcp", 0)
    proc = agent.start(d)
    wait_until(lambda: d.sysctl("net.ipv4.vs.sloppy_tcp") == 1, timeout=120, what="drift repaired by a full pass")
    status = agent.status(d)
    assert status["sysctls"] == {"net.ipv4.vs.expire_nodest_conn": 1, "net.ipv4.vs.sloppy_tcp": 1}
    agent.stop(proc)


def test_run_announces_after_its_first_full_pass_and_maintenance_withdraws_but_keeps_serving(topology):
    topo, agent = build(topology, drain_timeout=600)
    d = topo.directors[0]
    d.ip("route", "add", "blackhole", "198.51.100.77/32", "table", str(TABLE), "proto", "static")
    proc = agent.start(d)
    wait_until(lambda: announced(d) == [vip(1)], timeout=120, what="the VIP announced")
    code, body = health(d)
    assert code == 200 and body["announcing"] == {"table": TABLE, "gate": "open"}
    conns = topo.client.connect(vip(1), 80, sports=SPORTS)
    assert set(spread(conns)) == {"b1", "b2"}
    before = d.ipvsadm("-Ln")

    out = agent.cli(d, "director", "maintenance", "on", "--reason", "kernel upgrade").stdout
    assert f"withdrew 1 VIP(s) {vip(1)}" in out and "agent confirms maintenance on" in out
    assert announced(d) == []
    assert "198.51.100.77" in d.ip("route", "show", "table", str(TABLE)).stdout, "another protocol's route stays"
    code, body = health(d)
    assert code == 429 and body["maintenance"]["reason"] == "kernel upgrade"
    assert body["last_pass"]["failed"] == 0, "the agent's pass after the command finds nothing left to withdraw"
    assert d.ipvsadm("-Ln") == before, "IPVS is kept as it is in maintenance"
    assert all(c.ask() == c.backend for c in conns), "flows still arriving keep working"
    status = agent.cli(d, "director", "status").stdout
    assert "maintenance: on (kernel upgrade" in status and "announced (table 245): nothing" in status

    agent.stop(proc)
    proc = agent.start(d)
    wait_until(lambda: health(d)[0] == 429, timeout=120, what="the restarted agent's first pass, in maintenance")
    assert announced(d) == [], "maintenance survives an agent restart"

    out = agent.cli(d, "director", "maintenance", "off").stdout
    assert "agent confirms maintenance off; announced: 198.51.100.1" in out
    assert announced(d) == [vip(1)] and health(d)[0] == 200
    assert all(c.ask() == c.backend for c in conns)

    since = len(agent.log(d))
    agent.stop(proc)
    proc = agent.start(d)
    agent.wait_log(d, "start: nothing to change", timeout=120, since=since)
    assert announced(d) == [vip(1)], "a restart changes nothing"

    agent.remove("web", topo.backends[0])
    agent.remove("web", topo.backends[1])
    wait_until(lambda: announced(d) == [], timeout=60, what="the VIP without claims withdrawn")
    assert vip(1) in d.ipvsadm("-Ln"), "withdrawn before its service is deleted (it drains first)"
    agent.stop(proc)


def test_a_director_whose_catalog_cannot_be_read_announces_nothing_until_its_first_pass(topology):
    topo, agent = build(topology)
    d = topo.directors[0]
    agent.catalog_path.rename(agent.dir / "held-back.json")
    proc = agent.start(d)
    agent.wait_log(d, "waiting for a complete catalog", timeout=120)
    code, body = health(d)
    assert code == 503 and body["announcing"]["gate"].startswith("closed")
    assert announced(d) == [] and d.sysctl("net.ipv4.vs.sloppy_tcp") == 0, "nothing touched before a catalog"
    agent.write_catalog()
    wait_until(lambda: announced(d) == [vip(1)], timeout=120, what="announced once the pass is applied")
    assert d.sysctl("net.ipv4.vs.sloppy_tcp") == 1
    agent.stop(proc)


def test_expire_nodest_conn_makes_a_connection_to_a_deleted_real_server_fail_at_once_instead_of_hanging(topology):
    """Measured for the README: without it, packets of such a connection are dropped until its IPVS entry
    times out (15 minutes for an established TCP connection); with it the next packet is scheduled afresh
    and the new backend resets the connection."""
    topo, agent = build(topology, drain_timeout=0)
    d, b1 = topo.directors[0], topo.backends[0]
    outcomes = {}
    for expire in (0, 1):
        agent.config_overrides["sysctls"] = {"net.ipv4.vs.sloppy_tcp": 1, "net.ipv4.vs.expire_nodest_conn": expire}
        agent.instance("web", b1)
        agent.apply(d)
        conns = [c for c in topo.client.connect(vip(1), 80, n=20) if c.backend == "b1"]
        assert conns
        agent.remove("web", b1)
        assert "delete real server" in agent.apply(d)
        conn = conns[0]
        conn.timeout = 5
        started = time.monotonic()
        try:
            conn.ask()
            outcomes[expire] = ("answered", time.monotonic() - started)
        except TimeoutError:
            outcomes[expire] = ("hangs", time.monotonic() - started)
        except OSError as exc:
            outcomes[expire] = (type(exc).__name__, time.monotonic() - started)
        for c in conns:
            c.close()
    print(f"connection to a deleted real server: expire_nodest_conn=0 {outcomes[0]}, =1 {outcomes[1]}")
    assert outcomes[0][0] == "hangs"
    assert outcomes[1][0] == "ConnectionResetError" and outcomes[1][1] < 5


@contextlib.contextmanager
def announce_route(director, address: str) -> Iterator[RouteWatcher]:
    """Every change of the director's own announce route to `address` (to time its way to the router)."""
    watcher = RouteWatcher(director, address, table=TABLE)
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.stop()


def tcp_timeouts(node) -> int:
    """The node's TCP retransmission timeouts so far (TcpExt TCPTimeouts of its namespace)."""
    lines = node.run("cat", "/proc/net/netstat").stdout.splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            return int(dict(zip(head.split()[1:], values.split()[1:], strict=True))["TCPTimeouts"])
    raise AssertionError("no TcpExt in /proc/net/netstat")


def established_from(director, client_address: str) -> int:
    """How many established connections from this client the director's IPVS holds."""
    return len(re.findall(rf"ESTABLISHED\s+\[?{re.escape(client_address)}\]?:\d+", director.ipvsadm("-Lnc")))


def test_an_ipv6_vip_is_announced_through_a_real_router_and_withdrawn_like_the_ipv4_ones(topology):
    """gue mode, an IPv4 and an IPv6 VIP on two directors behind the examples' BIRD router: the IPv6 VIP is one
    /128 in the announce table, exported in the BGP session's ipv6 channel with the director's IPv6 address as
    next hop, and the router spreads IPv6 flows over both directors (DSR: the backends answer the client)."""
    subprocess.run(["modprobe", "sit"], check=True)  # on a real backend: `modprobe sit` (the agent says so)
    topo = topology(directors=2, backends=2, clients=1, routed=True)
    d1, d2 = topo.directors
    client = topo.client
    v4, v6 = vip(1), vip6(1)
    assert topo.router is not None and topo.router.sysctl("net.ipv6.fib_multipath_hash_policy") == 1
    assert client.sysctl("net.core.txrehash") == 0
    agents = RoutedAgents(topo, encapsulation="gue", tunnel_map=None, vip_cidrs=[VIP_NET, VIP6_NET],
                          resync_interval=300)
    for b in topo.backends:
        agents.instance("web", b)
        agents.instance("web6", b, tags=[f"maglev.vip=[{v6}]:80"])
    servers = [b.start_server(80, ipv6=True) for b in topo.backends]  # [::]:80 answers both families
    foreign = "2001:db8:10::77"
    d1.ip("-6", "route", "add", "blackhole", f"{foreign}/128", "table", str(TABLE), "proto", "static")
    router = RouterBed(topo, agents.dir, bfd_timing=CALM_BFD)  # measures no failure detection
    router.start()
    procs = {d.label: agents.start(d) for d in topo.directors}
    agents.apply_backends()
    for server in servers:
        server.wait_ready()
    with watching(router, v6) as route6, watching(router, v4) as route4:
        router.wait_nexthops(v6, topo.directors, timeout=300)
        router.wait_nexthops(v4, topo.directors, timeout=300)
        assert router.nexthops(foreign) == frozenset(), "a route of another protocol in the table is not exported"
        assert agents.status(d1)["announced"] == [v4, v6]
        with d1.entered(), urllib.request.urlopen("http://127.0.0.1:9119/metrics", timeout=30) as response:
            assert re.search(r"^maglev_bridge_announced_vips 2(\.0)?$", response.read().decode(), re.M)

        conns6 = client.connect(v6, 80, sports=range(43000, 43024))
        conns4 = client.connect(v4, 80, sports=range(44000, 44024))
        assert set(spread(conns6)) == {"b1", "b2"} and set(spread(conns4)) == {"b1", "b2"}
        assert all(established_from(d, str(client.address6)) > 0 for d in topo.directors), \
            "the router spreads IPv6 flows over both directors"
        wait_until(lambda: sum(d.ipvs_stats(f"[{v6}]", 80).conns for d in topo.directors) == 24, timeout=60,
                   what="IPVS counters of the IPv6 VIP")
        assert all(d.ipvs_stats(f"[{v6}]", 80).outpkts == 0 for d in topo.directors), "DSR: no reply via a director"

        # A loss episode: the client's retransmission timeouts must not move its flows to the other director
        # (topology.CLIENT_SYSCTLS: in this bed the router's ECMP would follow the client's socket hash)
        held = {d.label: established_from(d, str(client.address6)) for d in topo.directors}
        timeouts = tcp_timeouts(client)
        topo.router.run("nft", "add table inet loss; add chain inet loss f { type filter hook forward priority 0; }; "
                               f"add rule inet loss f ip6 daddr {v6} drop")
        for c in conns6:
            c.sock.sendall(b"?\n")
        wait_until(lambda: tcp_timeouts(client) >= timeouts + 2 * len(conns6), timeout=120,
                   what="two retransmission timeouts per connection")
        topo.router.run("nft", "delete table inet loss")
        assert [c.answer() for c in conns6] == [c.backend for c in conns6]
        assert {d.label: established_from(d, str(client.address6)) for d in topo.directors} == held, \
            "no flow reached the other director"

        with announce_route(d1, v6) as announce6:
            started = time.monotonic()
            out = agents.cli(d1, "director", "maintenance", "on", "--reason", "ipv6 test").stdout
            assert f"withdrew 2 VIP(s) {v4} {v6}" in out, out
            router.wait_nexthops(v6, [d2])
            router.wait_nexthops(v4, [d2])
            deleted = next(ts for ts, hops in announce6.changes if ts > started and not hops)
            dropped = next(ts for ts, hops in route6.changes if ts > started and d1.address6 not in hops)
        assert foreign in d1.ip("-6", "route", "show", "table", str(TABLE)).stdout, "another protocol's route stays"
        assert all(c.ask() == c.backend for c in conns6 + conns4), "flows moved to d2 keep their backend"

        with announce_route(d1, v6) as announce6:
            started = time.monotonic()
            out = agents.cli(d1, "director", "maintenance", "off").stdout
            assert "agent confirms maintenance off" in out, out
            router.wait_nexthops(v6, topo.directors)
            router.wait_nexthops(v4, topo.directors)
            added = next(ts for ts, hops in announce6.changes if ts > started and hops)
            joined = next(ts for ts, hops in route6.changes if ts > started and d1.address6 in hops)
        print(f"IPv6 VIP: announce route deleted -> router route without d1 {1000 * (dropped - deleted):.0f} ms; "
              f"added -> router route with d1 {1000 * (joined - added):.0f} ms")

        changes = len(route6.changes), len(route4.changes)
        since = len(agents.log(d2))
        agents.stop(procs["d2"])
        procs["d2"] = agents.start(d2)
        agents.wait_log(d2, "start: nothing to change", timeout=180, since=since)
        assert (len(route6.changes), len(route4.changes)) == changes, "an agent restart changes nothing on the router"
        assert all(c.ask() == c.backend for c in conns6 + conns4)
    for proc in procs.values():
        agents.stop(proc)
