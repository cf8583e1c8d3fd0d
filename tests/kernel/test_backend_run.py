"""`maglev-bridge run` as a backend against a real Consul (its node's local agent, in the backend's
namespace) puts its own node's VIPs on lo, the fou receiver and the sysctls in place, follows each change
of its own instances, and ignores what other nodes claim."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.harness.addresses import vip
from tests.harness.agent import AgentHarness
from tests.harness.consul_agent import ConsulAgent
from tests.harness.topology import Backend
from tests.harness.wait import wait_until

pytestmark = pytest.mark.kernel
HTTP_PORT = 9119


def put(consul: ConsulAgent, node: str, address: str, vips: list[str], status: str | None = "passing") -> None:
    """A registration as Nomad's Consul agent sends it, on the given node: the service with its check, or
    alone (`status` None)."""
    sid = f"web-{node}"
    body: dict[str, Any] = {
        "Node": node, "Address": address,
        "Service": {"ID": sid, "Service": "web", "Port": 80, "Tags": [f"maglev.vip={v}:80" for v in vips]}}
    if status is not None:
        body["Check"] = {"CheckID": f"service:{sid}", "Name": "ttl", "Status": status, "ServiceID": sid}
    consul.api("/v1/catalog/register", method="PUT", body=body)


def vips_on_lo(b: Backend) -> set[str]:
    out = b.run("ip", "-4", "-o", "addr", "show", "dev", "lo").stdout
    return {word.split("/")[0] for word in out.split() if word.startswith("198.51.100.")}


def health(b: Backend) -> dict[str, Any]:
    with b.entered():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/health", timeout=5) as resp:
                return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as err:
            return dict(json.loads(err.read()))


def test_a_running_backend_follows_its_own_node_in_consul_and_nothing_else(topology, consul_binary):
    topo = topology(directors=1, backends=1, clients=1)
    b = topo.backends[0]
    with b.entered():
        consul = ConsulAgent(consul_binary, persistent=True, start_timeout=180).start()
    try:
        agent = AgentHarness(topo, catalog_file=None, http_bind=f"127.0.0.1:{HTTP_PORT}",
                             consul={"address": f"http://127.0.0.1:{consul.http_port}", "wait": "5m"})
        with b.entered():
            put(consul, b.label, b.address, [vip(1)])
            put(consul, "elsewhere", "192.0.2.30", [vip(2)])
        proc = agent.start(b, role="backend")

        wait_until(lambda: vips_on_lo(b) == {vip(1)}, timeout=300, what="its VIP on lo")
        assert "5555" in b.run("ip", "fou", "show").stdout
        assert b.sysctl("net.ipv4.conf.all.arp_ignore") == 1 and b.sysctl("net.ipv4.conf.all.arp_announce") == 2
        assert b.sysctl("net.ipv4.conf.tunl0.rp_filter") == 0
        state = wait_until(lambda: (s := health(b)).get("ready") and s, timeout=180, what="ready")
        assert state["catalog"]["source"] == "consul node" and state["catalog"]["node"] == b.label, state

        # Edits elsewhere in the fleet: no answer, no pass, nothing in the kernel.
        answers, changes = state["catalog"]["answers"], state["catalog"]["changes"]
        with b.entered():
            put(consul, "elsewhere", "192.0.2.30", [vip(2), vip(4)], status="critical")
            put(consul, "further", "192.0.2.31", [vip(5)])
        # Its own tag edit (a second VIP, the service alone, which wakes one of its two queries) is followed;
        # what came before it has been answered by then.
        with b.entered():
            put(consul, b.label, b.address, [vip(1), vip(3)], status=None)
        wait_until(lambda: vips_on_lo(b) == {vip(1), vip(3)}, timeout=180, what="the added VIP on lo")
        after = health(b)["catalog"]
        assert (after["answers"] - answers, after["changes"] - changes) == (1, 1), after

        # A critical instance keeps its VIPs (its open connections drain); deregistration takes them away.
        with b.entered():
            put(consul, b.label, b.address, [vip(1), vip(3)], status="critical")
        wait_until(lambda: health(b)["catalog"]["changes"] > after["changes"], timeout=180, what="the check")
        assert vips_on_lo(b) == {vip(1), vip(3)}
        with b.entered():
            consul.api("/v1/catalog/deregister", method="PUT", body={"Node": b.label, "ServiceID": f"web-{b.label}"})
        wait_until(lambda: vips_on_lo(b) == set(), timeout=180, what="the VIPs gone from lo")
        assert agent.stop(proc) == 0
    finally:
        with b.entered():
            consul.close()
