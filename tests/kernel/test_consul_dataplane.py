"""Real Consul drives the real kernel (issue: Consul): a Consul server runs in the director's namespace (the
director's local agent), the director runs `maglev-bridge run` watching it. Registering a tagged service
makes connections to its VIP work, failing its TTL check drains it, deregistering removes it, and Consul
going away leaves the kernel exactly as it was."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from tests.harness.addresses import vip
from tests.harness.agent import AgentHarness
from tests.harness.consul_agent import ConsulAgent
from tests.harness.echo import spread
from tests.harness.wait import wait_until

pytestmark = pytest.mark.kernel


def agent_api(consul: ConsulAgent, path: str, body: object = None) -> None:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{consul.http_url}{path}", data=data, method="PUT")
    urllib.request.urlopen(request, timeout=10).read()


def register(consul: ConsulAgent, backend) -> str:
    sid = f"web-{backend.label}"
    agent_api(consul, "/v1/agent/service/register", {
        "ID": sid, "Name": "web", "Address": backend.address, "Port": 80,
        "Tags": [f"maglev.vip={vip(1)}:80"],
        "Check": {"CheckID": f"ttl-{sid}", "TTL": "300s", "Status": "passing"},
    })
    return sid


def health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return json.loads(err.read())


def test_consul_drives_the_kernel_and_its_outage_changes_nothing(topology, consul_binary):
    topo = topology(directors=1, backends=2, clients=1)
    d, (b1, b2) = topo.directors[0], topo.backends
    with d.entered():
        consul = ConsulAgent(consul_binary, persistent=True, start_timeout=180).start()
    try:
        agent = AgentHarness(topo, catalog_file=None, http_bind="127.0.0.1:9119",
                             consul={"address": f"http://127.0.0.1:{consul.http_port}", "wait": "5s"})
        for b in (b1, b2):  # the backend side from a file: this test is about the director and Consul
            agent.instance("web", b)
        for b in (b1, b2):
            agent.cli(b, "backend", "apply", "--role", "backend", "--catalog", str(agent.catalog_path))
        topo.serve(80)
        proc = agent.start(d)
        with d.entered():  # ready once the first pass ran (its reason may read "start, consul: ...")
            wait_until(lambda: health(9119).get("ready"), timeout=180)

        with d.entered():
            register(consul, b1)
        agent.wait_log(d, "add real server", timeout=180)
        assert set(spread(topo.client.connect(vip(1), 80, sports=range(40000, 40020)))) == {"b1"}

        with d.entered():
            register(consul, b2)
        agent.wait_log(d, "add real server 203.0.113.118:80", timeout=180)
        conns = topo.client.connect(vip(1), 80, sports=range(41000, 41040))
        assert set(spread(conns)) == {"b1", "b2"}

        mark = len(agent.log(d))
        with d.entered():
            agent_api(consul, "/v1/agent/check/fail/ttl-web-b2")
        agent.wait_log(d, "set real server 203.0.113.118:80 weight 0", timeout=180, since=mark)
        assert all(c.ask() == c.backend for c in conns), "open connections to a failing backend keep working"
        assert "b2" not in spread(topo.client.connect(vip(1), 80, sports=range(42000, 42040)))

        # Consul goes away: nothing in the kernel changes, the agent says so, and it resumes afterwards.
        before = d.ipvsadm("-Ln", "--nosort")
        with d.entered():  # while it shuts down Consul may still answer "500 No cluster leader"; then nothing
            consul.stop()
            state = wait_until(lambda: "unreachable" in json.dumps((s := health(9119))["catalog"]["errors"]) and s,
                               timeout=180)
        assert state["ready"] and state["degraded"], state
        assert d.ipvsadm("-Ln", "--nosort") == before
        assert all(c.ask() == c.backend for c in conns)
        log_mark = len(agent.log(d))
        with d.entered():
            consul.start()  # a restarted Consul agent restores TTL checks as critical until they are passed
            agent_api(consul, "/v1/agent/check/pass/ttl-web-b1")
            agent_api(consul, "/v1/agent/check/pass/ttl-web-b2")
        wait_until(lambda: re.findall(r"Route\s+1\s", d.ipvsadm("-Ln", "--nosort")) == ["Route   1 "] * 2, timeout=300)
        resumed = re.findall(r"^\S+ \S+ INFO maglev-bridge:   (\w+ .*)$", agent.log(d)[log_mark:], re.M)
        assert resumed and all(op.startswith("set real server") for op in resumed), resumed
        with d.entered():
            wait_until(lambda: not health(9119)["degraded"], timeout=180)

        mark = len(agent.log(d))
        with d.entered():
            agent_api(consul, "/v1/agent/service/deregister/web-b2")
        agent.wait_log(d, "set real server 203.0.113.118:80 weight 0", timeout=180, since=mark)
        agent.wait_log(d, "delete real server 203.0.113.118:80", timeout=180, since=mark)
        assert "203.0.113.118" not in d.ipvsadm("-Ln", "--nosort")
        assert agent.stop(proc) == 0
    finally:
        with d.entered():
            consul.close()
