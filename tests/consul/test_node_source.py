"""The backend role's node source against a real Consul: every kind of edit to its own node's services
reaches its snapshot as the very instances the director would see, and nothing on another node wakes it.

`wait` is long (5m) on purpose: no re-arm may hide a change that no blocking query reported."""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from bridge.agent.reconcile import backend_pass
from bridge.catalog.consul_format import parse_service
from bridge.catalog.node import NodeSource
from bridge.catalog.source import CatalogUnavailable
from bridge.core.config import Config, ConsulConfig, TunnelMapping
from bridge.core.model import Instance
from tests.harness.consul_agent import ConsulAgent
from tests.harness.wait import wait_until

pytestmark = pytest.mark.consul
OWN, OTHER = "app1", "app2"
ADDRESS = {OWN: "198.51.100.11", OTHER: "198.51.100.12"}


def vip_tag(last: int) -> str:
    return f"maglev.vip=203.0.113.{last}:80"


def config_for(consul: ConsulAgent, tmp_path: Any = None) -> Config:
    return Config(role="backend", node_name=OWN, vip_cidrs=(ipaddress.IPv4Network("203.0.113.0/24"),),
                  tunnel_map=(TunnelMapping(ipaddress.IPv4Network("198.51.100.0/24"),
                                            ipaddress.IPv4Network("100.64.0.0/24")),),
                  state_file=str(tmp_path / "state.json") if tmp_path else "/nonexistent/state.json",
                  consul=ConsulConfig(address=f"http://{consul.http_addr}", wait="5m"))


class Recorder:
    """The agent's side of `start`: every notification would have asked for a pass."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, reason: str) -> None:
        with self._lock:
            self.reasons.append(reason)

    def count(self) -> int:
        with self._lock:
            return len(self.reasons)


@pytest.fixture
def started(consul_agent: ConsulAgent) -> Iterator[tuple[NodeSource, Recorder]]:
    for node in (OWN, OTHER):
        put(consul_agent, node, "web", [vip_tag(1)], check="passing")
    put(consul_agent, OWN, "plain", ["untagged"], check="passing")
    source, recorder = NodeSource(config_for(consul_agent)), Recorder()
    source.start(recorder)
    wait_until(lambda: source.snapshot().instances, what="the node's first snapshot")
    try:
        yield source, recorder
    finally:
        source.stop()


def put(consul: ConsulAgent, node: str, service: str, tags: list[str], *, port: int = 80,
        check: str | None = None, address: str | None = None) -> None:
    """A registration as Nomad's Consul agent sends it: the service alone, or with its check."""
    sid = f"{service}-{node}"
    body: dict[str, Any] = {"Node": node, "Address": address or ADDRESS[node],
                            "Service": {"ID": sid, "Service": service, "Port": port, "Tags": tags}}
    if check is not None:
        body["Check"] = {"CheckID": f"service:{sid}", "Name": "ttl", "Status": check, "ServiceID": sid}
    consul.api("/v1/catalog/register", method="PUT", body=body)


def set_check(consul: ConsulAgent, node: str, check_id: str, status: str, service_id: str = "") -> None:
    consul.api("/v1/catalog/register", method="PUT", body={
        "Node": node, "Address": ADDRESS[node], "SkipNodeUpdate": True,
        "Check": {"CheckID": check_id, "Name": check_id, "Status": status, "ServiceID": service_id}})


def drop(consul: ConsulAgent, node: str, service: str) -> None:
    consul.api("/v1/catalog/deregister", method="PUT", body={"Node": node, "ServiceID": f"{service}-{node}"})


def directors_view(consul: ConsulAgent, node: str) -> tuple[Instance, ...]:
    """What the director's source makes of the same catalog (every tagged service read by name), kept to
    the node's instances."""
    names = [name for name, tags in consul.api("/v1/catalog/services").items()
             if any(t.startswith("maglev.vip=") for t in tags or ())]
    found = [i for name in sorted(names) for i in
             parse_service(name, json.dumps(consul.api(f"/v1/health/service/{name}"))).instances if i.node == node]
    return tuple(found)


def own_edits(consul: ConsulAgent) -> list[tuple[str, Callable[[], None]]]:
    return [
        ("registration with a check", lambda: put(consul, OWN, "api", [vip_tag(2)], check="passing")),
        ("registration without a check", lambda: put(consul, OWN, "cache", [vip_tag(3)])),
        ("the vip tag added to an untagged service, alone", lambda: put(consul, OWN, "plain", [vip_tag(4)])),
        ("a vip tag edited, alone", lambda: put(consul, OWN, "plain", [vip_tag(5)])),
        ("the vip tag removed, alone", lambda: put(consul, OWN, "plain", ["untagged"])),
        ("a port edited, alone", lambda: put(consul, OWN, "api", [vip_tag(2)], port=8080)),
        ("an instance check critical", lambda: set_check(consul, OWN, "service:api-app1", "critical", "api-app1")),
        ("an instance check passing", lambda: set_check(consul, OWN, "service:api-app1", "passing", "api-app1")),
        ("a node check critical", lambda: set_check(consul, OWN, "node-health", "critical")),
        ("a node check passing", lambda: set_check(consul, OWN, "node-health", "passing")),
        ("the node's address", lambda: put(consul, OWN, "cache", [vip_tag(3)], address="198.51.100.21")),
        ("deregistration without a check", lambda: drop(consul, OWN, "cache")),
        ("deregistration with its check", lambda: drop(consul, OWN, "api")),
    ]


def test_every_kind_of_edit_to_its_own_node_reaches_the_snapshot_as_the_director_sees_it(consul_agent, started):
    source, recorder = started
    for what, edit in own_edits(consul_agent):
        before = recorder.count()
        edit()
        expected = directors_view(consul_agent, OWN)
        wait_until(lambda expected=expected: source.snapshot().instances == expected, timeout=30,
                   what=f"{what} in the snapshot")
        assert recorder.count() == before + 1, what


def test_no_change_on_another_node_wakes_it_up(consul_agent, started):
    source, recorder = started
    woke, told = source.answers, recorder.count()
    put(consul_agent, OTHER, "api", [vip_tag(2)], check="passing")
    put(consul_agent, OTHER, "web", [vip_tag(6)])
    set_check(consul_agent, OTHER, "service:web-app2", "critical", "web-app2")
    set_check(consul_agent, OTHER, "node-health", "critical")
    put(consul_agent, OTHER, "web", [vip_tag(6)], address="198.51.100.22")
    drop(consul_agent, OTHER, "api")
    put(consul_agent, "app3", "web", [vip_tag(1)], check="critical", address="198.51.100.13")
    # Then one check of its own, which wakes exactly one of its two queries: everything before it has been
    # answered by then, so whatever the edits elsewhere woke is counted.
    set_check(consul_agent, OWN, "service:web-app1", "critical", "web-app1")
    wait_until(lambda: source.snapshot().instances[0].health == "critical", timeout=30, what="its own edit")
    assert (source.answers - woke, recorder.count() - told) == (1, 1)


def test_rejected_claims_of_its_own_instances_show_in_its_pass(consul_agent, started, tmp_path):
    source, _ = started
    put(consul_agent, OWN, "bad", ["maglev.vip=192.0.2.1:80"], check="passing")
    put(consul_agent, OTHER, "bad", ["maglev.vip=192.0.2.2:80"], check="passing")
    wait_until(lambda: any(i.service == "bad" for i in source.snapshot().instances), timeout=30, what="bad")
    outcome = backend_pass(source.snapshot(), config_for(consul_agent, tmp_path), dry_run=True)
    assert [(r.service, r.instance) for r in outcome.rejected] == [("bad", "bad-app1")]


def test_while_consul_is_away_it_keeps_the_last_snapshot_and_says_so_then_recovers(consul_agent_persistent):
    consul = consul_agent_persistent
    put(consul, OWN, "web", [vip_tag(1)], check="passing")
    source = NodeSource(config_for(consul))
    source.start(Recorder())
    try:
        kept = wait_until(lambda: source.snapshot().instances, what="the node's first snapshot")
        consul.stop()
        wait_until(lambda: not source.health()["ok"], timeout=60, what="the outage in its health")
        assert source.snapshot().instances == kept
        consul.start()
        wait_until(lambda: source.health()["ok"], timeout=120, what="recovery")
        assert source.snapshot().instances == kept
    finally:
        source.stop()


def test_a_node_name_consul_does_not_know_is_an_error_that_says_what_to_set(consul_agent):
    put(consul_agent, OWN, "web", [vip_tag(1)], check="passing")
    source = NodeSource(replace(config_for(consul_agent), node_name="not-this-node"))
    source.start(Recorder())
    try:
        wait_until(lambda: not source.health()["ok"], timeout=60, what="the error")
        with pytest.raises(CatalogUnavailable, match="'not-this-node' is not in Consul's catalog: set node_name"):
            source.snapshot()
    finally:
        source.stop()
