"""The agent, both roles, through its command line, on a real kernel: TCP through a VIP, FOU tunnels, DSR."""

from __future__ import annotations

import re
import time

import pytest

from tests.harness.addresses import vip
from tests.harness.agent import AgentHarness, tunnel_of
from tests.harness.echo import spread
from tests.harness.wait import wait_until

pytestmark = pytest.mark.kernel
SPORTS = range(40000, 40040)


def build(topology, backends=3, **config):
    topo = topology(directors=1, backends=backends, clients=1)
    agent = AgentHarness(topo, **config)
    for b in topo.backends:
        agent.instance("web", b)
    topo.serve(80)
    agent.apply_backends()
    return topo, agent


def real_servers(director, port=80):
    """(address, weight) in kernel list order, from ipvsadm, the independent witness."""
    out = director.ipvsadm("-Ln", "--nosort", "-t", f"{vip(1)}:{port}")
    return re.findall(r"->\s+([\d.]+):\d+\s+Route\s+(\d+)", out)


def test_connections_reach_every_healthy_backend_and_replies_bypass_the_director(topology):
    topo, agent = build(topology)
    out = agent.apply(topo.directors[0])
    assert "add service 198.51.100.1:80/tcp scheduler mh flags mh-fallback,mh-port  ok" in out
    conns = topo.client.connect(vip(1), 80, sports=SPORTS)
    assert set(spread(conns)) == {"b1", "b2", "b3"}
    assert all(c.ask() == c.backend for c in conns)
    stats = topo.directors[0]
    wait_until(lambda: stats.ipvs_stats(vip(1), 80).conns == 40)
    s = stats.ipvs_stats(vip(1), 80)
    assert s.inpkts > 0 and s.outpkts == 0, "replies must go straight from the backends to the client (DSR)"
    # the backend side was configured by the agent, not by the test
    b = topo.backends[0]
    assert "5555" in b.run("ip", "fou", "show").stdout
    assert f"{vip(1)}/32" in b.run("ip", "-4", "addr", "show", "dev", "lo").stdout
    assert b.sysctl("net.ipv4.conf.all.arp_ignore") == 1 and b.sysctl("net.ipv4.conf.all.arp_announce") == 2
    assert b.sysctl("net.ipv4.conf.tunl0.rp_filter") == 0


def test_reapplying_an_unchanged_catalog_changes_nothing(topology):
    topo, agent = build(topology)
    agent.apply(topo.directors[0])
    before = topo.directors[0].ipvsadm("-Ln")
    assert "director: nothing to change" in agent.apply(topo.directors[0])
    assert topo.directors[0].ipvsadm("-Ln") == before


def test_real_servers_are_listed_newest_registration_first(topology):
    topo, agent = build(topology)
    agent.apply(topo.directors[0])
    assert [a for a, _ in real_servers(topo.directors[0])] == [tunnel_of(b) for b in reversed(topo.backends)]


def test_a_critical_backend_gets_no_new_flows_while_its_open_connections_keep_working(topology):
    topo, agent = build(topology)
    agent.apply(topo.directors[0])
    conns = topo.client.connect(vip(1), 80, sports=SPORTS)
    on_b1 = [c for c in conns if c.backend == "b1"]
    assert on_b1
    agent.set_status("web", topo.backends[0], "critical")
    out = agent.apply(topo.directors[0])
    ops = re.findall(r"^\s+\d+\. (.*?)  ok$", out, re.M)
    assert ops == [f"set real server {tunnel_of(topo.backends[0])}:80 weight 0 in 198.51.100.1:80/tcp"]
    assert all(c.ask() == "b1" for c in on_b1), "established connections to a drained backend keep working"
    fresh = topo.client.connect(vip(1), 80, sports=range(41000, 41060))
    assert "b1" not in spread(fresh)
    agent.set_status("web", topo.backends[0], "passing")
    agent.apply(topo.directors[0])
    assert "b1" in spread(topo.client.connect(vip(1), 80, sports=range(42000, 42060)))


def test_one_changed_instance_costs_one_or_two_netlink_operations(topology):
    topo, agent = build(topology, backends=4)
    agent.apply(topo.directors[0])

    def ops_after(change) -> list[str]:
        change()
        return re.findall(r"^\s+\d+\. (.*?)  ok$", agent.apply(topo.directors[0]), re.M)

    b1, b4 = topo.backends[0], topo.backends[3]
    assert len(ops_after(lambda: agent.set_status("web", b1, "critical"))) == 1
    assert len(ops_after(lambda: agent.set_status("web", b1, "passing"))) == 1
    assert len(ops_after(lambda: agent.instance("web", b4, weight=3))) == 1
    assert len(ops_after(lambda: agent.remove("web", b4))) == 1  # weight 0 now, deleted after drain_timeout


def test_deregistered_backend_drains_then_is_deleted_with_its_tunnel(topology):
    topo, agent = build(topology)
    d = topo.directors[0]
    agent.apply(d)
    agent.remove("web", topo.backends[0])
    agent.apply(d)
    assert (tunnel_of(topo.backends[0]), "0") in real_servers(d)
    time.sleep(2.5)
    out = agent.apply(d)
    assert f"delete real server {tunnel_of(topo.backends[0])}:80" in out
    assert tunnel_of(topo.backends[0]) not in [a for a, _ in real_servers(d)]
    assert "mglc0000215" not in d.run("ip", "-br", "link").stdout


def test_a_bad_tag_rejects_one_claim_and_nothing_else(topology):
    topo, agent = build(topology)
    agent.instance("api", topo.backends[1], port=8080, tags=["maglev.vip=198.51.100.2:8080/sctp"])
    agent.instance("dns", topo.backends[2], port=53, tags=["maglev.vip=198.51.100.3/udp"])
    out = agent.apply(topo.directors[0])
    assert ("REJECTED service api instance api-b2 tag 'maglev.vip=198.51.100.2:8080/sctp': "
            "protocol 'sctp' is not tcp or udp") in out
    listing = topo.directors[0].ipvsadm("-Ln")
    assert "198.51.100.2" not in listing
    assert "UDP  198.51.100.3:53 mh" in listing and "TCP  198.51.100.1:80 mh" in listing
    assert "198.51.100.2" not in topo.directors[0].run("ip", "route", "show", "table", "local").stdout


def test_state_the_agent_does_not_own_survives(topology):
    topo, agent = build(topology)
    d = topo.directors[0]
    d.run("ipvsadm", "-A", "-t", "203.0.113.250:443", "-s", "rr")
    d.run("ipvsadm", "-a", "-t", "203.0.113.250:443", "-r", "192.0.2.99:443", "-g")
    d.run("ip", "route", "add", "table", "local", "local", "198.51.100.0/24", "dev", "lo", "proto", "kernel")
    d.run("ip", "route", "add", "198.51.100.200/32", "dev", "lo", "proto", "static")
    d.run("ip", "link", "add", "name", "lbtun9", "type", "ipip", "remote", "192.0.2.99", "local", d.address)
    d.run("ip", "link", "add", "name", "mgl-keep", "type", "dummy")
    foreign = (d.ipvsadm("-Ln", "-t", "203.0.113.250:443"), d.run("ip", "route", "show", "table", "all").stdout)
    agent.apply(d)
    agent.entries.clear()
    agent.write_catalog()
    agent.apply(d)
    time.sleep(2.5)
    out = agent.apply(d)
    assert "delete service 198.51.100.1:80/tcp" in out
    assert "TCP  198.51.100.1:80" not in d.ipvsadm("-Ln")
    assert d.ipvsadm("-Ln", "-t", "203.0.113.250:443") == foreign[0]
    routes = d.run("ip", "route", "show", "table", "all").stdout
    assert "local 198.51.100.0/24 dev lo table local proto kernel" in routes
    assert "198.51.100.200 dev lo proto static" in routes
    assert "lbtun9" in d.run("ip", "-br", "link").stdout and "mgl-keep" in d.run("ip", "-br", "link").stdout
    assert "mglc" not in d.run("ip", "-br", "link").stdout


def test_removing_the_last_claim_of_a_backend_removes_its_vip(topology):
    topo, agent = build(topology, backends=1)
    b = topo.backends[0]
    assert f"{vip(1)}/32" in b.run("ip", "-4", "addr", "show", "dev", "lo").stdout
    agent.remove("web", b)
    agent.apply_backends()
    assert f"{vip(1)}/32" not in b.run("ip", "-4", "addr", "show", "dev", "lo").stdout
    assert "5555" in b.run("ip", "fou", "show").stdout


def test_restarting_the_agent_leaves_established_connections_untouched(topology):
    topo, agent = build(topology)
    d = topo.directors[0]
    proc = agent.start(d)
    agent.wait_log(d, "start: applied", timeout=240)
    conns = topo.client.connect(vip(1), 80, sports=SPORTS)
    listing = d.ipvsadm("-Ln", "--nosort")
    assert agent.stop(proc) == 0
    assert d.ipvsadm("-Ln", "--nosort") == listing, "shutting down must leave the kernel as it is"
    assert all(c.ask() == c.backend for c in conns)
    proc = agent.start(d)
    agent.wait_log(d, "start: nothing to change", timeout=240)
    assert all(c.ask() == c.backend for c in conns)
    agent.set_status("web", topo.backends[1], "critical")
    agent.wait_log(d, "weight 0 in 198.51.100.1:80/tcp", timeout=120)
    assert agent.stop(proc) == 0
    assert all(c.ask() == c.backend for c in conns)
