"""The Consul catalog source against a real Consul agent."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from bridge.catalog.consul import ConsulSource
from bridge.catalog.source import CatalogUnavailable
from bridge.core.config import Config, ConsulConfig
from tests.consul.helpers import deregister, register, set_health
from tests.harness.consul_agent import ConsulAgent
from tests.harness.wait import wait_until

pytestmark = pytest.mark.consul
VIP = "maglev.vip=198.51.100.10:80"


def source_for(consul: ConsulAgent, **consul_options) -> ConsulSource:
    config = Config(vip_cidrs=(ipaddress.IPv4Network("198.51.100.0/24"),),
                    consul=ConsulConfig(address=f"http://{consul.http_addr}", wait="2s", **consul_options))
    return ConsulSource(config)


class Changes:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.event = threading.Event()

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.event.set()


def instances(source):
    return {(i.service, i.node, i.health) for i in source.snapshot().instances}


def test_only_tagged_services_are_watched_and_health_changes_arrive(consul_agent):
    register(consul_agent, "web", "b1", "192.0.2.11", 80, [VIP])
    register(consul_agent, "web", "b2", "192.0.2.12", 80, [VIP])
    register(consul_agent, "mail", "b1", "192.0.2.11", 25, ["smtp"])
    source, changes = source_for(consul_agent), Changes()
    source.start(changes)
    try:
        wait_until(lambda: instances(source) == {("web", "b1", "passing"), ("web", "b2", "passing")})
        assert source.health()["tagged_services"] == 1
        set_health(consul_agent, "web", "b2", "192.0.2.12", "critical")
        wait_until(lambda: ("web", "b2", "critical") in instances(source))
        assert any(r == "consul: web changed" for r in changes.reasons)
        deregister(consul_agent, "web", "b1")
        wait_until(lambda: instances(source) == {("web", "b2", "critical")})
        register(consul_agent, "db", "b3", "192.0.2.13", 5432, ["maglev.vip=198.51.100.11"])
        wait_until(lambda: ("db", "b3", "passing") in instances(source))
    finally:
        source.stop()


def test_a_health_change_costs_one_notification_not_a_storm(consul_agent):
    for n in range(5):
        register(consul_agent, f"svc{n}", "b1", "192.0.2.11", 80, [f"maglev.vip=198.51.100.{10 + n}:80"])
    source, changes = source_for(consul_agent), Changes()
    source.start(changes)
    try:
        wait_until(lambda: len(source.snapshot().instances) == 5)
        wait_until(lambda: source.health()["ok"])
        # A service's data is in the snapshot a moment before its notification: wait for all five first.
        wait_until(lambda: sorted(changes.reasons) == [f"consul: svc{n} changed" for n in range(5)])
        before = len(changes.reasons)
        set_health(consul_agent, "svc3", "b1", "192.0.2.11", "critical")
        wait_until(lambda: len(changes.reasons) > before)
        threading.Event().wait(1.0)
        assert changes.reasons[before:] == ["consul: svc3 changed"]
    finally:
        source.stop()


def test_consul_going_away_keeps_the_last_catalog_and_resumes_when_it_returns(consul_agent_persistent):
    consul = consul_agent_persistent
    register(consul, "web", "b1", "192.0.2.11", 80, [VIP])
    source, changes = source_for(consul), Changes()
    source.start(changes)
    try:
        wait_until(lambda: instances(source) == {("web", "b1", "passing")})
        consul.stop()
        # while it shuts down Consul may still answer "500 No cluster leader"; then the port is closed
        wait_until(lambda: "unreachable" in str(source.health()["errors"]))
        assert instances(source) == {("web", "b1", "passing")}, "an outage must never empty the catalog"
        consul.start()
        set_health(consul, "web", "b1", "192.0.2.11", "critical")
        wait_until(lambda: instances(source) == {("web", "b1", "critical")}, timeout=120)
        wait_until(lambda: source.health()["ok"], timeout=120)
    finally:
        source.stop()


def test_before_the_first_complete_answer_there_is_no_catalog_at_all(consul_agent):
    consul_agent.stop()
    source = source_for(consul_agent)
    source.start(lambda reason: None)
    try:
        with pytest.raises(CatalogUnavailable):
            source.snapshot()
    finally:
        source.stop()


def test_token_without_read_permission_is_one_clear_error_and_no_empty_catalog(consul_binary, tmp_path):
    acl = {"acl": {"enabled": True, "default_policy": "allow", "tokens": {"initial_management": "root-token"}}}
    with ConsulAgent(consul_binary, extra_config=acl) as consul:
        import consul as pyconsul
        root = pyconsul.Consul(host="127.0.0.1", port=consul.http_port, token="root-token")
        register(consul, "web", "b1", "192.0.2.11", 80, [VIP])
        rules = {"service_prefix": {"": {"policy": "deny"}}, "node_prefix": {"": {"policy": "deny"}}}
        policy = root.acl.policy.create("deny-catalog", rules=rules)
        weak = root.acl.token.create(description="no catalog read", policies_id=[policy["ID"]])["SecretID"]
        token_file = tmp_path / "token"
        token_file.write_text(weak + "\n")
        source = source_for(consul, token_file=str(token_file))
        source.start(lambda reason: None)
        try:
            state = wait_until(lambda: source.health()["errors"] and source.health())
            message = state["errors"]["services"]
            assert "Consul ACL" in message and "filtered by ACLs" in message
            assert weak not in str(state), "the token must never be printed"
            with pytest.raises(CatalogUnavailable):
                source.snapshot()
        finally:
            source.stop()


def test_consul_over_mutual_tls_checks_the_certificate_against_tls_server_name(consul_binary, tmp_path):
    from tests.harness.nomad_cluster import make_tls_files

    tls = make_tls_files(tmp_path / "tls", region="dc1")  # the server's certificate names server.dc1.nomad
    with ConsulAgent(consul_binary, tls=tls) as consul:
        register(consul, "web", "b1", "192.0.2.11", 80, [VIP])

        def source(**options: str) -> ConsulSource:
            config = Config(vip_cidrs=(ipaddress.IPv4Network("198.51.100.0/24"),),
                            consul=ConsulConfig(address=consul.https_url, wait="2s", ca_file=str(tls.ca),
                                                **options))
            return ConsulSource(config)

        good = source(cert_file=str(tls.cli_cert), key_file=str(tls.cli_key), tls_server_name="server.dc1.nomad")
        wrong_name = source(cert_file=str(tls.cli_cert), key_file=str(tls.cli_key), tls_server_name="consul.example")
        no_cert = source(tls_server_name="server.dc1.nomad")
        for s in (good, wrong_name, no_cert):
            s.start(lambda reason: None)
        try:
            wait_until(lambda: instances(good) == {("web", "b1", "passing")})
            for refused in (wrong_name, no_cert):
                wait_until(lambda refused=refused: refused.health()["errors"])
                with pytest.raises(CatalogUnavailable):
                    refused.snapshot()
            assert "consul.example" in str(wrong_name.health()["errors"])
        finally:
            for s in (good, wrong_name, no_cert):
                s.stop()


def register_many(consul: ConsulAgent, count: int) -> None:
    for n in range(count):
        register(consul, f"svc-{n}", f"b{n}", f"192.0.2.{n + 11}", 80, [f"maglev.vip=198.51.100.{n + 1}:80"])


def test_more_tagged_services_than_consul_allows_connections_fit_the_budget(consul_binary):
    with ConsulAgent(consul_binary, extra_config={"limits": {"http_max_conns_per_client": 7}}) as consul:
        register_many(consul, 30)
        source = source_for(consul, max_connections=6)
        source.start(lambda reason: None)
        try:
            wait_until(lambda: len(source.snapshot().instances) == 30)
            state = source.health()
            assert state["ok"] and "429" not in state["error_counts"]
            assert state["connections"]["most"] <= 6
        finally:
            source.stop()


def test_a_budget_above_what_consul_allows_says_which_setting_to_change(consul_binary):
    with ConsulAgent(consul_binary, extra_config={"limits": {"http_max_conns_per_client": 4}}) as consul:
        register_many(consul, 30)
        source = source_for(consul, max_connections=12)
        source.start(lambda reason: None)
        try:
            message = wait_until(lambda: next((m for m in source.health()["errors"].values() if "429" in m), None))
            assert "consul.max_connections" in message and "http_max_conns_per_client" in message
        finally:
            source.stop()


def test_a_watch_loop_that_dies_unexpectedly_is_reported_and_restarted(consul_agent, monkeypatch):
    import bridge.catalog.consul as consul_module

    register(consul_agent, "web", "b1", "192.0.2.11", 80, [VIP])
    real = consul_module.make_async_client
    calls = []

    def fails_once(config, connections):
        calls.append(config)
        if len(calls) == 1:
            raise RuntimeError("injected: no client")
        return real(config, connections)

    monkeypatch.setattr(consul_module, "make_async_client", fails_once)
    source = source_for(consul_agent)
    source.start(lambda reason: None)
    try:
        wait_until(lambda: "injected: no client" in str(source.health()["errors"]), interval=0.02)
        wait_until(lambda: instances(source) == {("web", "b1", "passing")})
        wait_until(lambda: source.health()["ok"])
    finally:
        source.stop()


def test_an_answer_that_cannot_be_taken_in_is_reported_and_the_watch_goes_on(consul_agent, monkeypatch):
    import bridge.catalog.consul as consul_module

    register(consul_agent, "web", "b1", "192.0.2.11", 80, [VIP])
    real = consul_module.parse_service
    broken = threading.Event()
    broken.set()

    def parse(name, body):
        if broken.is_set():
            raise RuntimeError("injected: parser bug")
        return real(name, body)

    monkeypatch.setattr(consul_module, "parse_service", parse)
    source = source_for(consul_agent)
    source.start(lambda reason: None)
    try:
        wait_until(lambda: "injected: parser bug" in str(source.health()["errors"].get("health:web")))
        with pytest.raises(CatalogUnavailable):
            source.snapshot()
        broken.clear()
        set_health(consul_agent, "web", "b1", "192.0.2.11", "critical")
        wait_until(lambda: instances(source) == {("web", "b1", "critical")})
        wait_until(lambda: source.health()["ok"])
    finally:
        source.stop()


def test_a_new_service_and_new_tags_are_fetched_from_the_service_list_alone(consul_agent, monkeypatch):
    """The service list names them: they are fetched without waiting for a sweep of every tagged service's
    index (sweeps are switched off here once the source has its first catalog)."""
    register(consul_agent, "web", "b1", "192.0.2.11", 80, [VIP])
    source = source_for(consul_agent)
    source.start(lambda reason: None)

    async def no_sweep(self: ConsulSource) -> int:
        return 0

    try:
        wait_until(lambda: instances(source) == {("web", "b1", "passing")})
        monkeypatch.setattr(ConsulSource, "_sweep", no_sweep)
        register(consul_agent, "db", "b3", "192.0.2.13", 5432, ["maglev.vip=198.51.100.11"])
        wait_until(lambda: ("db", "b3", "passing") in instances(source))
        register(consul_agent, "web", "b1", "192.0.2.11", 80, [VIP, "maglev.weight=3"])
        wait_until(lambda: {i.tags for i in source.snapshot().instances if i.service == "web"}
                   == {(VIP, "maglev.weight=3")})
    finally:
        source.stop()
