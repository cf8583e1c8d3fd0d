"""/metrics as Prometheus reads it (parsed back with prometheus_client's own parser), from a shadow-mode
agent: per-real-server series with node_exporter's labels, kube-proxy-style pass metrics, the table
fingerprint `status` prints, drains, and bounded rejection reasons."""

from __future__ import annotations

import aiohttp
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from bridge.catalog.consul import (
    ConsulAccessError,
    ConsulAnswerError,
    TooManyRequests,
    UnreadableName,
    error_kind,
)
from bridge.catalog.consul_format import CatalogFormatError
from bridge.catalog.source import CatalogUnavailable
from bridge.core.keys import DestKey, ServiceKey
from bridge.core.live import DestStats, LiveAllow, LiveFilter, LiveRealServer, LiveService
from bridge.core.model import DesiredState, RealServer, Rejection, VirtualService
from bridge.core.ops import SetSysctl
from bridge.dataplane.shadow import ShadowKernel
from bridge.files.maintenance import Maintenance, write_maintenance
from bridge.inspect.metrics import (
    CONSUL_ERROR_KINDS,
    backend_text,
    filter_metrics,
    rejection_reason,
)
from bridge.inspect.status import service_fingerprints
from tests.catalog_builder import health_entry
from tests.harness.metrics_reference import reference_backend_families, reference_text
from tests.harness.shadow_agent import Catalog, Flaky, director, scrape, shadow_agent, web


def test_every_real_server_has_node_exporter_labels_weights_and_counters(tmp_path):
    agent = shadow_agent(tmp_path, Catalog([web(1), web(2)]))
    agent.sync("start", full=True)
    metrics = scrape(agent)
    active = metrics["maglev_bridge_ipvs_backend_connections_active"]
    assert {tuple(sorted(labels)) for labels, _ in active} == {
        ("local_address", "local_port", "proto", "remote_address", "remote_port")}
    assert sorted((labels["local_address"], labels["remote_address"]) for labels, _ in active) == [
        ("198.51.100.2", "203.0.113.11"), ("198.51.100.3", "203.0.113.12")]
    assert {v for _, v in metrics["maglev_bridge_ipvs_backend_weight"]} == {1}
    assert {v for _, v in metrics["maglev_bridge_ipvs_backend_desired_weight"]} == {1}
    assert len(metrics["maglev_bridge_ipvs_backend_incoming_bytes_total"]) == 2
    assert metrics["maglev_bridge_ipvs_read_ok"] == [({}, 1)]
    agent.close_dataplane()


def test_passes_are_histograms_full_and_scoped_with_last_success_and_fail_static(tmp_path):
    source = Catalog([web(1), web(2)])
    agent = shadow_agent(tmp_path, source)
    agent.sync("start", full=True)
    source.entries[0] = web(1, "critical")
    agent.sync("consul: svc-1 changed", full=False)
    metrics = scrape(agent)
    assert metrics["maglev_bridge_sync_full_proxy_rules_duration_seconds_count"] == [({}, 1)]
    assert metrics["maglev_bridge_sync_partial_proxy_rules_duration_seconds_count"] == [({}, 1)]
    assert metrics["maglev_bridge_sync_proxy_rules_total"] == [({}, 2)]
    assert dict((labels["result"], v) for labels, v in metrics["maglev_bridge_sync_proxy_rules_operations_total"]) \
        == {"ok": 2 + 2 * 2 + 2 * 3 + 1, "failed": 0}  # the director's two sysctls, then as before
    assert metrics["maglev_bridge_sync_proxy_rules_last_timestamp_seconds"][0][1] == agent.record.last_pass_at
    assert agent.record.last_success_at == agent.record.last_pass_at
    assert metrics["maglev_bridge_fail_static"] == [({}, 0)]
    desired = {labels["remote_address"]: v for labels, v in metrics["maglev_bridge_ipvs_backend_desired_weight"]}
    assert desired == {"203.0.113.11": 0, "203.0.113.12": 1}, "a critical real server is asked for weight 0"

    source.entries.pop()
    agent.sync("consul: svc-2 changed", full=False)
    drains = scrape(agent)["maglev_bridge_ipvs_backend_drain_deadline_timestamp_seconds"]
    assert [(labels["remote_address"], v) for labels, v in drains] == [
        ("203.0.113.12", agent.memory.drain_deadlines[DestKey.parse("198.51.100.3:80/tcp>203.0.113.12:80")])]

    def unavailable() -> None:
        raise CatalogUnavailable("Consul away")

    source.snapshot = unavailable  # type: ignore[method-assign]
    agent.sync("resync", full=True)
    assert scrape(agent)["maglev_bridge_fail_static"] == [({}, 1)]
    agent.close_dataplane()


def test_each_virtual_service_carries_the_fingerprint_status_prints(tmp_path):
    agent = shadow_agent(tmp_path, Catalog([web(1), web(2)]))
    agent.sync("start", full=True)
    info = scrape(agent)["maglev_bridge_virtual_service_info"]
    prints = service_fingerprints(agent.shadow_state().services, agent.memory.last_weights, agent.config.mh_table_size)
    expected = {key.text: fingerprint for key, fingerprint in prints.items()}
    assert {f"{labels['local_address']}:{labels['local_port']}/{labels['proto']}": labels["fingerprint"]
            for labels, _ in info} == expected
    assert {labels["service"] for labels, _ in info} == {"svc-1", "svc-2"}
    agent.close_dataplane()


def test_rejection_reasons_are_a_fixed_set_whatever_the_tags_say():
    def reason(tag: str) -> str:
        return rejection_reason(Rejection("s", "i", tag, "anything \x1b at all"), "maglev")

    assert [reason("maglev.weight=²"), reason("maglev.vip=x"), reason("maglev.flags=y"), reason("maglev.zzz=1"),
            reason("maglev.\x1b[2J"), reason("")] == ["weight", "vip", "flags", "other_tag", "other_tag", "catalog"]


def test_consul_watch_errors_are_counted_by_a_fixed_set_of_kinds_429_its_own():
    errors = [TooManyRequests("429"), ConsulAccessError("403"), UnreadableName("404"), ConsulAnswerError("500"),
              TimeoutError(), aiohttp.ClientConnectionError(), CatalogFormatError("x"), RuntimeError("bug")]
    kinds = [error_kind(e) for e in errors]
    assert kinds == ["429", "acl", "unreadable_name", "answer", "timeout", "unreachable", "format", "other"]
    assert set(kinds) <= set(CONSUL_ERROR_KINDS)


AWKWARD = st.text(alphabet=st.sampled_from('a1.:"\\\n{}=, \u00e9\u2603#'), max_size=8)
COUNT = st.one_of(st.integers(0, 2_000_000), st.integers(0, 2**64 - 1), st.sampled_from([999_999, 1_000_000]))
REAL_SERVER = st.builds(LiveRealServer, address=AWKWARD, port=st.integers(0, 65535), weight=st.integers(0, 65535),
                        active_conns=COUNT, inactive_conns=COUNT,
                        stats=st.builds(DestStats, COUNT, COUNT, COUNT, COUNT, COUNT))
SERVICE = st.builds(LiveService, vip=AWKWARD, port=st.integers(0, 65535), protocol=st.sampled_from(["tcp", "udp"]),
                    scheduler=st.just("mh"), flags=st.just(()),
                    real_servers=st.lists(REAL_SERVER, max_size=4).map(tuple))


@settings(max_examples=150, deadline=None)
@given(services=st.lists(SERVICE, max_size=5).map(tuple), data=st.data())
def test_the_per_real_server_text_is_prometheus_clients_own_byte_for_byte_and_parses_the_same(services, data):
    pairs = [(s, rs) for s in services for rs in s.real_servers]
    chosen = data.draw(st.lists(st.sampled_from(pairs), unique_by=lambda p: id(p[1])) if pairs else st.just([]))
    deadlines = {DestKey(s.key, rs.address, rs.port): data.draw(st.floats(0, 4e9, allow_nan=False))
                 for s, rs in chosen}
    desired = DesiredState(virtual_services=tuple(
        VirtualService(s.vip, s.port, s.protocol, "mh", (), "svc", real_servers=tuple(
            RealServer(rs.address, rs.port, weight, weight, "b", "n", 0)
            for rs in s.real_servers[:data.draw(st.integers(0, len(s.real_servers)))]
            for weight in [data.draw(st.integers(0, 256))]))
        for s in services[:data.draw(st.integers(0, len(services)))]), tunnels=(), vip_routes=(), rejected=())
    fast = backend_text(services, desired, deadlines)
    slow = reference_text(reference_backend_families(services, desired, deadlines))
    assert fast == slow
    assert [(f.name, f.type, f.documentation, f.samples) for f in text_string_to_metric_families(fast)] == \
        [(f.name, f.type, f.documentation, f.samples) for f in text_string_to_metric_families(slow)]


def test_a_director_exports_its_announced_vips_maintenance_since_when_and_each_allow_lists_drops(tmp_path):
    allowed = health_entry("svc-9", "b9", "192.0.2.19", 80, ["maglev.vip=198.51.100.9:80", "maglev.allow=10.0.0.0/8"])
    source = Catalog([web(1), web(2), allowed])
    agent = director(tmp_path, source)
    agent.sync("start", full=True)
    metrics = scrape(agent)
    assert metrics["maglev_bridge_announced_vips"] == [({}, 3)]
    assert metrics["maglev_bridge_announce_gate_open"] == [({}, 1)]
    assert metrics["maglev_bridge_maintenance"] == [({}, 0)]
    assert "maglev_bridge_maintenance_since_timestamp_seconds" not in metrics
    assert metrics["maglev_bridge_filter_read_ok"] == [({}, 1)]
    assert metrics["maglev_bridge_filter_dropped_packets_total"] == [
        ({"local_address": "198.51.100.9", "local_port": "80", "proto": "tcp"}, 0)], "only a service with a list"

    assert agent.config.bgp is not None
    write_maintenance(agent.config.bgp.maintenance_file, Maintenance("kernel upgrade", 1_700_000_000.5, "ops@lb1"))
    agent.watch(agent.reconciler.maintenance_changed)
    agent.sync(*agent.trigger.take())
    metrics = scrape(agent)
    assert metrics["maglev_bridge_maintenance"] == [({}, 1)]
    assert metrics["maglev_bridge_maintenance_since_timestamp_seconds"] == [({}, 1_700_000_000.5)]
    assert metrics["maglev_bridge_announced_vips"] == [({}, 0)], "maintenance withdraws every VIP"
    agent.close_dataplane()


def test_drops_are_the_named_counters_packets_per_virtual_service():
    table = LiveFilter(True, (LiveAllow(ServiceKey("198.51.100.9", 443, "tcp"), ("10.0.0.0/8",), 7, True, 12345),
                              LiveAllow(ServiceKey("198.51.100.9", 53, "udp"), ("10.0.0.0/8",), 8, True, 0),
                              LiveAllow(ServiceKey("198.51.100.10", 80, "tcp"), ("10.0.0.0/8",), None, False)))
    (family,) = text_string_to_metric_families(reference_text(list(filter_metrics(table))))
    assert [(s.name, s.labels, s.value) for s in family.samples] == [
        ("maglev_bridge_filter_dropped_packets_total",
         {"local_address": "198.51.100.9", "local_port": "443", "proto": "tcp"}, 12345),
        ("maglev_bridge_filter_dropped_packets_total",
         {"local_address": "198.51.100.9", "local_port": "53", "proto": "udp"}, 0)], "no counter, no series"
    (unread,) = text_string_to_metric_families(reference_text(list(filter_metrics(None))))
    assert unread.samples == []


def test_the_last_sync_timestamp_stays_put_while_passes_complete_with_failed_operations(tmp_path):
    """kube-proxy's meaning: the last *successful* sync, so `time() - ..._last_timestamp_seconds` grows while a
    director's passes run but the kernel refuses their operations."""
    source = Catalog([web(1)])
    agent = director(tmp_path, source, Flaky(SetSysctl))
    agent.sync("start", full=True)
    assert agent.record.last_pass_at is not None and agent.record.last_success_at is None
    assert "maglev_bridge_sync_proxy_rules_last_timestamp_seconds" not in scrape(agent)
    agent.reconciler.dataplane = ShadowKernel(agent.reconciler.dataplane.read())  # type: ignore[union-attr]
    agent.sync("retry", full=True)
    succeeded = agent.record.last_success_at
    assert succeeded == agent.record.last_pass_at
    assert scrape(agent)["maglev_bridge_sync_proxy_rules_last_timestamp_seconds"] == [({}, succeeded)]
    agent.close_dataplane()

