"""The per-real-server metric families built the library's way, with prometheus_client: what
bridge.inspect.metrics.backend_text must equal byte for byte (tests/test_metrics.py), and the cost it is measured
against (bench/metrics_bench.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from bridge.core.keys import DestKey
from bridge.core.live import LiveService
from bridge.core.model import DesiredState
from bridge.inspect.metrics import BACKEND_FAMILIES, BACKEND_PREFIX, DRAIN_DOC


def reference_backend_families(services: tuple[LiveService, ...], desired: DesiredState | None,
                               deadlines: dict[str, float]) -> list[Metric]:
    """The per-real-server families as prometheus_client builds them: what backend_text must equal (and what
    bench/metrics_bench.py measures it against)."""
    wanted = {(vs.key, rs.address, rs.port): rs.weight for vs in (desired.virtual_services if desired else ())
              for rs in vs.real_servers}
    labels = ["local_address", "local_port", "proto", "remote_address", "remote_port"]
    families: list[Metric] = [
        (CounterMetricFamily(BACKEND_PREFIX + suffix.removesuffix("_total"), doc, labels=labels) if kind == "counter"
         else GaugeMetricFamily(BACKEND_PREFIX + suffix, doc, labels=labels)) for suffix, kind, doc in BACKEND_FAMILIES]
    drain = GaugeMetricFamily(BACKEND_PREFIX + "drain_deadline_timestamp_seconds", DRAIN_DOC, labels=labels)
    for service in services:
        for rs in service.real_servers:
            values = [service.vip, str(service.port), service.protocol, rs.address, str(rs.port)]
            stats = rs.stats
            row = (rs.active_conns, rs.inactive_conns, rs.weight, wanted.get((service.key, rs.address, rs.port), 0),
                   stats.connections, stats.packets_in, stats.packets_out, stats.bytes_in, stats.bytes_out)
            for family, value in zip(families, row, strict=True):
                family.add_metric(values, value)
            deadline = deadlines.get(DestKey(service.key, rs.address, rs.port))
            if deadline is not None:
                drain.add_metric(values, deadline)
    return [*families[:4], drain, *families[4:]]


def reference_text(families: list[Metric]) -> str:
    class Families:
        def collect(self) -> list[Metric]:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families())  # type: ignore[arg-type]
    return generate_latest(registry).decode()
