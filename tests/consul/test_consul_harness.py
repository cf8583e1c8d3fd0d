"""The test harness's real Consul agent starts, answers over HTTP and DNS, and restarts as the tests expect."""

from __future__ import annotations

import urllib.error

import pytest

from tests.harness.consul_agent import ConsulAgent, resolver
from tests.harness.wait import wait_until


@pytest.mark.consul
def test_consul_leader_and_service_dns(consul_agent: ConsulAgent) -> None:
    assert consul_agent.api("/v1/status/leader") == f"127.0.0.1:{consul_agent.server_port}"
    consul_agent.register_service(
        {"Name": "web", "ID": "web-1", "Address": "127.0.0.2", "Port": 8080, "Tags": ["maglev"]}
    )
    r = resolver(consul_agent)
    a = wait_until(lambda: r.resolve("web.service.consul", "A"))
    assert [rr.address for rr in a] == ["127.0.0.2"]
    srv = r.resolve("maglev.web.service.consul", "SRV")
    assert [rr.port for rr in srv] == [8080]


@pytest.mark.consul
def test_consul_dev_restart_keeps_ports(consul_agent: ConsulAgent) -> None:
    http, dns_port = consul_agent.http_addr, consul_agent.dns_port
    consul_agent.stop()
    with pytest.raises(urllib.error.URLError):
        consul_agent.api("/v1/status/leader")
    consul_agent.restart()
    assert (consul_agent.http_addr, consul_agent.dns_port) == (http, dns_port)
    assert consul_agent.api("/v1/status/leader")


@pytest.mark.consul
def test_consul_persistent_restart_keeps_data(consul_agent_persistent: ConsulAgent) -> None:
    agent = consul_agent_persistent
    agent.kv_put("maglev/probe", "42")
    agent.register_service({"Name": "db", "ID": "db-1", "Address": "127.0.0.3", "Port": 5432})
    wait_until(lambda: agent.api("/v1/catalog/service/db"))
    agent.restart(down_for=0.5)
    # Ready means a leader and this node in the catalog; the rest of the raft log may still be replaying.
    assert wait_until(lambda: agent.kv_get("maglev/probe")) == b"42"
    db = wait_until(lambda: agent.api("/v1/catalog/service/db"))
    assert [s["ServiceAddress"] for s in db] == ["127.0.0.3"]
    agent.reset()
    assert agent.kv_get("maglev/probe") is None
