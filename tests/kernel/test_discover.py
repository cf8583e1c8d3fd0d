"""`status --discover` (issues: Consul, every director agrees): three directors register themselves in Consul,
are found through Consul DNS (A and SRV), and one table shows whether their Maglev tables agree."""

from __future__ import annotations

import dns.message
import dns.query
import dns.rdatatype
import pytest

from tests.harness.addresses import vip
from tests.harness.agent import AgentHarness
from tests.harness.consul_agent import ConsulAgent
from tests.harness.wait import wait_until
from tests.kernel.test_consul_dataplane import register

pytestmark = pytest.mark.kernel


def resolve(consul: ConsulAgent, rdtype: dns.rdatatype.RdataType) -> list[str]:
    query = dns.message.make_query("maglev-bridge.service.consul.", rdtype)
    answer = dns.query.udp(query, "127.0.0.1", port=consul.dns_port, timeout=15).answer
    return sorted(rr.to_text() for rrset in answer for rr in rrset)


def test_directors_are_found_through_consul_dns_and_a_differing_table_is_flagged(topology, consul_binary):
    topo = topology(directors=3, backends=2, clients=1)
    d1 = topo.directors[0]
    with d1.entered():
        consul = ConsulAgent(consul_binary, start_timeout=180, extra_config={"client_addr": "0.0.0.0"}).start()
    try:
        procs = []
        harnesses = []
        for d in topo.directors:
            agent = AgentHarness(topo, catalog_file=None, http_bind=f"{d.address}:9119", resync_interval=600,
                                 consul={"address": f"http://192.0.2.11:{consul.http_port}", "wait": "5s",
                                         "dns_address": f"127.0.0.1:{consul.dns_port}"})
            procs.append(agent.start(d))
            harnesses.append(agent)
        with d1.entered():
            for b in topo.backends:
                register(consul, b)
            wait_until(lambda: len(resolve(consul, dns.rdatatype.A)) == 3, timeout=180)
            addresses = resolve(consul, dns.rdatatype.A)
            ports = resolve(consul, dns.rdatatype.SRV)
        assert addresses == ["192.0.2.11", "192.0.2.12", "192.0.2.13"]
        assert len(ports) == 3 and all(" 9119 " in srv for srv in ports)
        for d, agent in zip(topo.directors, harnesses, strict=True):
            agent.wait_log(d, "add real server 203.0.113.118:80", timeout=120)

        result = harnesses[0].cli(d1, "director", "status", "--discover")
        assert result.returncode == 0, result.stdout
        assert "3 director(s); all agree on every virtual service" in result.stdout
        assert result.stdout.count(f"{vip(1)}:80/tcp") == 3

        d3 = topo.directors[2]  # the list order changes by hand on one director: same ipvsadm -Ln, other table
        tail = d3.ipvsadm("-Ln", "--nosort", "-t", f"{vip(1)}:80").split("\n")[-2].split()[1]
        d3.run("ipvsadm", "-d", "-t", f"{vip(1)}:80", "-r", tail)
        d3.run("ipvsadm", "-a", "-t", f"{vip(1)}:80", "-r", tail, "-g", "-w", "1")
        result = harnesses[0].cli(d1, "director", "status", "--discover", check=False)
        assert result.returncode == 1
        assert "192.0.2.13:9119" in result.stdout and "NO: tables differ" in result.stdout
        assert "1 virtual service(s) with differing tables: 198.51.100.1:80/tcp" in result.stdout
        for proc, agent in zip(procs, harnesses, strict=True):
            assert agent.stop(proc) == 0
        with d1.entered():
            wait_until(lambda: resolve(consul, dns.rdatatype.SRV) == [], timeout=120)
    finally:
        with d1.entered():
            consul.close()
