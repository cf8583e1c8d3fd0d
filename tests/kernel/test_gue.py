"""`encapsulation: gue` on a real kernel, through the agent's command line: IPVS encapsulates itself (tunnel
forwarding, GUE), the backends receive with `ip fou add port 6080 gue`, replies go straight to the clients
(DSR), and the director holds no link and no route per backend. `ipvsadm -Ln --tun-info` is the witness of
each real server's tunnel type and port (a port sent in host byte order would show as 49175, not 6080)."""

from __future__ import annotations

import re
import signal
import socket
import time

import pytest

from tests.harness.addresses import vip
from tests.harness.agent import AgentHarness, tunnel_of
from tests.harness.echo import spread
from tests.harness.router_bed import CALM_BFD
from tests.harness.wait import wait_until
from tests.kernel import test_failover as failover_bed
from tests.kernel.test_ipv6_underlay import counters, dual_stack

pytestmark = pytest.mark.kernel
SPORTS = range(40000, 40040)
GUE = {"encapsulation": "gue", "tunnel_map": None}
failover = failover_bed.failover  # the failover test bed's fixture (a router, BIRD, long-lived connections)


def build(topology, udp=False, **config):
    topo = topology(directors=1, backends=3, clients=1)
    agent = AgentHarness(topo, **config)
    for b in topo.backends:
        agent.instance("web", b)
        if udp:
            agent.instance("dns", b, port=53, tags=[f"maglev.vip={vip(2)}:53/udp"])
    topo.serve(80)
    if udp:
        topo.serve(53, "udp")
    agent.apply_backends()
    return topo, agent


def tunnels(director, key):
    """address -> (forward method, tunnel info) of one service's real servers, from ipvsadm --tun-info."""
    out = director.ipvsadm("-Ln", "--tun-info", *key)
    return {m[1]: (m[2], m[3]) for m in re.finditer(r"->\s+([\d.]+):\d+\s+(\w+)\s+(\S*)", out)}, out


def test_gue_carries_tcp_and_udp_with_dsr_through_no_link_and_drains_in_place(topology):
    topo, agent = build(topology, udp=True, **GUE)
    d = topo.directors[0]
    d.run("ipvsadm", "-A", "-t", "203.0.113.250:443", "-s", "rr")
    d.run("ipvsadm", "-a", "-t", "203.0.113.250:443", "-r", "192.0.2.99:443", "-i", "--tun-type", "gue",
          "--tun-port", "5555")
    foreign = d.ipvsadm("-Ln", "--tun-info", "-t", "203.0.113.250:443")
    out = agent.apply(d)
    assert f"add real server {topo.backends[0].address}:80 weight 1 via gue port 6080 in {vip(1)}:80/tcp  ok" in out
    for key in (("-t", f"{vip(1)}:80"), ("-u", f"{vip(2)}:53")):
        found, listing = tunnels(d, key)
        assert set(found) == {b.address for b in topo.backends}, listing
        assert all(method == "Tunnel" and "gue" in info.lower() and "6080" in info
                   for method, info in found.values()), listing
    assert "mgl" not in d.run("ip", "-br", "link").stdout, "gue mode creates no link"
    assert d.run("ip", "route", "show", "proto", "245").stdout.strip() == "", "and no tunnel route"
    for b in topo.backends:
        assert re.search(r"port 6080 gue", b.run("ip", "fou", "show").stdout)
        assert b.sysctl("net.ipv4.conf.tunl0.rp_filter") == 0

    conns = topo.client.connect(vip(1), 80, sports=SPORTS)
    assert set(spread(conns)) == {"b1", "b2", "b3"} and all(c.ask() == c.backend for c in conns)
    answers = topo.client.udp(vip(2), 53, range(41000, 41030))
    assert set(answers) == {"b1", "b2", "b3"}
    wait_until(lambda: d.ipvs_stats(vip(1), 80).conns == 40 and d.ipvs_stats(vip(2), 53, "udp").conns == 30)
    for port, proto in ((80, "tcp"), (53, "udp")):
        s = d.ipvs_stats(vip(1) if port == 80 else vip(2), port, proto)
        assert s.inpkts > 0 and s.outpkts == 0, f"{proto}: replies must go straight to the client (DSR)"
    status = agent.status(d)
    assert status["encapsulation"] == "gue"
    assert "underlay MTU 1500 on eth0" in status["mtu_warning"] and "1532" in status["mtu_warning"]

    b1 = topo.backends[0]
    on_b1 = [c for c in conns if c.backend == "b1"]
    agent.set_status("web", b1, "critical")
    out = agent.apply(d)
    assert re.findall(r"^\s+\d+\. (.*?)  ok$", out, re.M) == [
        f"set real server {b1.address}:80 weight 0 via gue port 6080 in {vip(1)}:80/tcp"]
    found, listing = tunnels(d, ("-t", f"{vip(1)}:80"))
    assert found[b1.address][0] == "Tunnel" and "6080" in found[b1.address][1], \
        f"a weight edit keeps the tunnel settings:\n{listing}"
    assert all(c.ask() == "b1" for c in on_b1), "established connections to a drained backend keep working"
    assert "b1" not in spread(topo.client.connect(vip(1), 80, sports=range(42000, 42040)))
    assert "director: nothing to change" in agent.apply(d)
    assert d.ipvsadm("-Ln", "--tun-info", "-t", "203.0.113.250:443") == foreign, "foreign IPVS state untouched"


def test_restarting_the_agent_in_gue_mode_leaves_established_connections_untouched(topology):
    topo, agent = build(topology, **GUE)
    d = topo.directors[0]
    proc = agent.start(d)
    agent.wait_log(d, "start: applied", timeout=240)
    conns = topo.client.connect(vip(1), 80, sports=SPORTS)
    listing = d.ipvsadm("-Ln", "--nosort", "--tun-info")
    assert agent.stop(proc) == 0
    assert d.ipvsadm("-Ln", "--nosort", "--tun-info") == listing, "shutting down leaves the kernel as it is"
    proc = agent.start(d)
    agent.wait_log(d, "start: nothing to change", timeout=240)
    assert "underlay MTU 1500 on eth0" in agent.log(d), "the MTU warning is logged"
    assert all(c.ask() == c.backend for c in conns)
    assert agent.stop(proc) == 0
    assert "mgl" not in d.run("ip", "-br", "link").stdout


def test_a_director_switched_from_fou_to_gue_keeps_its_connections_on_their_old_tunnels(topology):
    """One director's step of the migration runbook: backends receive both; the director's old real servers
    (tunnel addresses, direct routing through their links) drain at weight 0 while new flows go by GUE to the
    backends' addresses; no established connection notices."""
    topo, agent = build(topology, receive=["fou", "gue"], drain_timeout=600)
    d = topo.directors[0]
    for b in topo.backends:
        fou = b.run("ip", "fou", "show").stdout
        assert "port 5555 ipproto 4" in fou and "port 6080 gue" in fou, fou
    agent.apply(d)
    conns = topo.client.connect(vip(1), 80, sports=SPORTS)
    assert set(spread(conns)) == {"b1", "b2", "b3"}
    agent.config_overrides["encapsulation"] = "gue"
    out = agent.apply(d)
    for b in topo.backends:
        assert f"set real server {tunnel_of(b)}:80 weight 0 in {vip(1)}:80/tcp  ok" in out
        assert f"add real server {b.address}:80 weight 1 via gue port 6080 in {vip(1)}:80/tcp  ok" in out
    found, listing = tunnels(d, ("-t", f"{vip(1)}:80"))
    assert {found[tunnel_of(b)][0] for b in topo.backends} == {"Route"}, listing
    assert {found[b.address][0] for b in topo.backends} == {"Tunnel"}, listing
    assert all(c.ask() == c.backend for c in conns), "connections on the old real servers keep working"
    fresh = topo.client.connect(vip(1), 80, sports=range(43000, 43040))
    assert set(spread(fresh)) == {"b1", "b2", "b3"} and all(c.ask() == c.backend for c in fresh)
    assert all(c.ask() == c.backend for c in conns)
    assert "mglc" in d.run("ip", "-br", "link").stdout, "the old tunnels stay while their real servers drain"


def test_a_changed_gue_port_is_set_in_place_and_connections_follow_it(topology):
    """IPVS's SET_DEST edits a real server's tunnel settings and its connections' packets use them from the
    next one on: a new gue_port costs one `set` per real server and no connection."""
    topo, agent = build(topology, **GUE)
    d = topo.directors[0]
    agent.apply(d)
    conns = topo.client.connect(vip(1), 80, sports=SPORTS)
    agent.config_overrides["gue_port"] = 6081
    agent.apply_backends()  # a second GUE receiver; the agent never deletes one
    assert all("port 6081 gue" in b.run("ip", "fou", "show").stdout for b in topo.backends)
    out = agent.apply(d)
    assert sorted(re.findall(r"^\s+\d+\. (.*?)  ok$", out, re.M)) == sorted(
        f"set real server {b.address}:80 weight 1 via gue port 6081 in {vip(1)}:80/tcp" for b in topo.backends)
    found, listing = tunnels(d, ("-t", f"{vip(1)}:80"))
    assert all("6081" in info for _, info in found.values()), listing
    for b in topo.backends:  # the old receiver gone: only the new port can carry the packets now
        b.run("ip", "fou", "del", "port", "6080")
    assert all(c.ask() == c.backend for c in conns), "connections follow the new port"


@pytest.mark.parametrize("conn_sync", [False, True], ids=["without-sync", "with-sync"])
def test_a_live_switch_of_two_directors_from_fou_to_gue_harms_no_connection(failover, conn_sync):
    """The migration runbook's director step, behind a real router (BIRD, ECMP over two directors) with 60
    long-lived connections asking every 100 ms: backends receive both, then each running agent is switched
    to gue by SIGHUP, one after the other, in rotation. A flow that stays on its director keeps its backend
    (its connection is bound to the old real server, which drains through its old tunnel). A flow the router
    moves between a fou and a gue director is scheduled afresh with the other mode's table and may reach
    another backend, unless connection synchronisation gave the new director its connection (bound to the old
    real server it still holds while it drains). So: with synchronisation, no connection may be harmed;
    without it, only if the router moved flows."""
    bed = failover(directors=2, bfd_timing=CALM_BFD, conn_sync=conn_sync)
    bed.agents.config_overrides.update(receive=["fou", "gue"], drain_timeout=600)
    bed.start()
    bed.start_traffic()
    carried = bed.connections_by_director()
    assert all(carried.values()), "connections on both directors"
    routes = len(bed.watcher.changes)
    bed.hold(2)
    bed.agents.config_overrides["encapsulation"] = "gue"
    switched = {}
    for d in bed.directors:
        since = len(bed.agents.log(d))
        bed.agents.config_path(d, "director")
        switched[d.label] = time.monotonic()
        bed.procs[d.label].send_signal(signal.SIGHUP)
        bed.agents.wait_log(d, f"via gue port 6080 in {vip(1)}:80/tcp", since=since, timeout=180)
        found, listing = tunnels(d, ("-t", f"{vip(1)}:80"))
        assert sorted(method for method, _ in found.values()) == ["Route"] * 3 + ["Tunnel"] * 3, listing
        bed.hold(2)
    bed.hold(3)
    rec = bed.stop_traffic()
    harmed = [(f.sport, next((k for k, v in carried.items() if f.sport in v), "?"), f.backend, f.reset)
              for f in rec.flows if f.reset is not None or len({b for _, b in f.backends}) > 1]
    why = (f"switched at {switched}; harmed (sport, director, backend, reset at): {harmed}; route changes "
           f"{bed.watcher.changes[routes:]}; {bed.bfd_report()}; {rec.summary()}")
    print(why)
    if conn_sync:
        assert not harmed, why
        failover_bed.unharmed(rec, bed)
    else:
        assert not harmed or bed.watcher.changes[routes:], f"connections harmed, yet the router moved no flow: {why}"


@pytest.mark.parametrize("conn_sync", [False, True], ids=["without-sync", "with-sync"])
def test_flows_moved_to_a_switched_director_keep_their_backend_only_with_connection_sync(failover, conn_sync):
    """The danger of the migration's mixed period, and its remedy: d1 is switched to gue while d2 still
    forwards by fou, then d2 goes into maintenance, so the router moves d2's flows to d1. Without connection
    synchronisation d1 schedules them afresh with its gue table, and most reach another backend (reset). With
    it, d1 holds their connections, bound to the old real servers it keeps while they drain: none is harmed."""
    bed = failover(directors=2, bfd_timing=CALM_BFD, conn_sync=conn_sync)
    bed.agents.config_overrides.update(receive=["fou", "gue"], drain_timeout=600)
    bed.start()
    bed.start_traffic()
    d1, d2 = bed.directors
    on_d2 = bed.connections_by_director()["d2"]
    assert on_d2, "connections on d2"
    bed.agents.config_overrides["encapsulation"] = "gue"
    since = len(bed.agents.log(d1))
    bed.agents.config_path(d1, "director")
    bed.procs[d1.label].send_signal(signal.SIGHUP)
    bed.agents.wait_log(d1, f"via gue port 6080 in {vip(1)}:80/tcp", since=since, timeout=180)
    bed.agents.config_overrides["encapsulation"] = "fou"  # d2 stays fou: its file is rewritten by maintenance
    bed.hold(3)
    bed.maintenance(d2, "on")
    bed.wait_route([d1])
    bed.hold(3)
    rec = bed.stop_traffic()
    moved = [f for f in rec.flows if f.sport in on_d2]
    harmed = [f for f in moved if f in rec.resets() or f in rec.changed_backend()]
    print(f"conn_sync={conn_sync}: {len(harmed)} of the {len(moved)} flows d2 held harmed (with sync d2 also holds "
          f"copies of d1's); {rec.summary()}")
    if conn_sync:
        failover_bed.unharmed(rec, bed)
    else:
        assert harmed, f"expected flows moved across the modes to break without sync; {rec.summary()}"
        assert all(f.sport in on_d2 for f in rec.resets() + rec.changed_backend()), "only moved flows may break"


VIP6 = "2001:db8:10::10"


def test_an_ipv6_vip_over_the_ipv4_underlay_in_gue_mode_with_dsr(topology):
    """IPv6 clients, an IPv6 VIP, IPv4 backends: IPVS puts the IPv6 packet in GUE to the backend's IPv4
    address, the backend's fou hands it to sit0, and the backend answers the client directly over IPv6."""
    topo, d, client, v6, agent = dual_stack(topology, "sit")  # on a real backend: `modprobe sit` (the agent says so)
    servers = []
    for b in topo.backends:
        agent.instance("web6", b, tags=[f"maglev.vip=[{VIP6}]:80"])
        agent.instance("dns6", b, port=53, tags=[f"maglev.vip=[{VIP6}]:53/udp"])
        servers += [b.start_server(80, "tcp", ipv6=True), b.start_server(53, "udp", ipv6=True)]
    for server in servers:
        server.wait_ready()
    agent.apply_backends()
    for b in topo.backends:
        assert "UP" in b.run("ip", "-br", "link", "show", "sit0").stdout, "the agent brought sit0 up"
        assert f"{VIP6}/128" in b.run("ip", "-6", "addr", "show", "dev", "lo").stdout
    out = agent.apply(d)
    assert f"add real server {topo.backends[0].address}:80 weight 1 via gue port 6080 in [{VIP6}]:80/tcp  ok" in out
    for key in (("-t", f"[{VIP6}]:80"), ("-u", f"[{VIP6}]:53")):
        found, listing = tunnels(d, key)
        assert set(found) == {b.address for b in topo.backends}, listing
        assert all(method == "Tunnel" and "6080" in info for method, info in found.values()), listing

    answers: list[str] = []
    with client.entered():
        conns = []
        for sport in range(40000, 40024):
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.settimeout(30)
            s.bind((v6[client.label], sport))
            s.connect((VIP6, 80))
            conns.append(s)
        tcp = [s.recv(64).decode().strip() for s in conns]
        for s in conns:
            s.sendall(b"again\n")
        assert [s.recv(64).decode().strip() for s in conns] == tcp, "each connection stays on its backend"
        for s in conns:
            s.close()
        for sport in range(41000, 41024):
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u:
                u.settimeout(30)
                u.bind((v6[client.label], sport))
                u.sendto(b"?\n", (VIP6, 53))
                answers.append(u.recvfrom(64)[0].decode().strip())
    assert set(tcp) == {"b1", "b2"} and set(answers) == {"b1", "b2"}

    wait_until(lambda: counters(d, "-t", f"[{VIP6}]:80")[0] == 24 and counters(d, "-u", f"[{VIP6}]:53")[0] == 24)
    for flag, service in (("-t", f"[{VIP6}]:80"), ("-u", f"[{VIP6}]:53")):
        _, inpkts, outpkts = counters(d, flag, service)
        assert inpkts > 0 and outpkts == 0, f"{service}: replies go straight to the client (DSR)"
