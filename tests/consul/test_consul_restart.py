"""The director's Consul watch after the local Consul agent restarts and comes back with the same raft index (a
restart that lost nothing and changed nothing): its error clears as soon as Consul answers again, not when a
blocking query's `wait` runs out."""

from __future__ import annotations

import ipaddress
import urllib.request

import pytest

from bridge.catalog.consul import ConsulSource
from bridge.core.config import Config, ConsulConfig
from tests.consul.helpers import register
from tests.harness.consul_agent import ConsulAgent
from tests.harness.wait import wait_until

pytestmark = pytest.mark.consul
WAIT = "5m"
"""Consul's blocking wait, as the agent's default: the error must clear long before it runs out."""
FEEDS = ("/v1/catalog/services", "/v1/catalog/nodes", "/v1/health/state/critical", "/v1/health/state/warning",
         "/v1/catalog/service/web")


def indexes(consul: ConsulAgent) -> dict[str, str]:
    """X-Consul-Index of each query the watch makes: what a blocking query waits to see move."""
    found = {}
    for path in FEEDS:
        with urllib.request.urlopen(f"{consul.http_url}{path}", timeout=10) as answer:
            found[path] = answer.headers["X-Consul-Index"]
    return found


def healthy(source: ConsulSource) -> bool:
    state = source.health()
    assert state["ok"], state["errors"]  # "not yet", and the errors are what a timeout shows
    return True


def test_consul_back_with_the_same_index_is_healthy_again_without_waiting_for_a_change(consul_agent_persistent):
    consul = consul_agent_persistent
    register(consul, "web", "b1", "192.0.2.11", 80, ["maglev.vip=198.51.100.10:80"])
    config = Config(vip_cidrs=(ipaddress.IPv4Network("198.51.100.0/24"),),
                    consul=ConsulConfig(address=f"http://{consul.http_addr}", wait=WAIT))
    source = ConsulSource(config)
    source.start(lambda reason: None)
    try:
        wait_until(lambda: source.health()["ok"] and len(source.snapshot().instances) == 1, what="first catalog")
        before = wait_until(lambda: (lambda a, b: a == b and a)(indexes(consul), indexes(consul)),
                            what="Consul's indexes settled")
        consul.stop()
        wait_until(lambda: "unreachable" in str(source.health()["errors"]), what="the watch noticed Consul gone")
        consul.start()
        assert indexes(consul) == before, "the premise: Consul came back with the very same indexes"
        wait_until(lambda: healthy(source), timeout=60, what=f"healthy again well within the {WAIT} wait")
        assert {(i.service, i.node, i.health) for i in source.snapshot().instances} == {("web", "b1", "passing")}
        after = indexes(consul)
        del after["/v1/catalog/nodes"], before["/v1/catalog/nodes"]  # Consul re-syncs its own node a moment later
        assert after == before, "no other index moved meanwhile: only the watch's own recovery cleared the errors"
    finally:
        source.stop()
