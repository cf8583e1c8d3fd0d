"""A director agent on the shadow data plane (the agent's model of the kernel), fed a catalog held in memory:
how the unit tests of the agent's passes, announcements, metrics and BIRD, and the real-Consul tests of its
registration and Prometheus, run the agent without a kernel."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bridge.agent.director import DirectorReconciler
from bridge.agent.shell import Agent
from bridge.catalog.consul_format import snapshot_from_services
from bridge.core.config import BgpConfig, Config
from bridge.core.model import Snapshot
from bridge.core.ops import Op, OpResult
from bridge.dataplane.shadow import ShadowKernel
from tests.catalog_builder import catalog, health_entry
from tests.harness.consul_agent import free_port
from tests.harness.web import CONFIG


class Catalog:
    """The agent's catalog source, its entries changed in place by the test."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.entries = entries

    def snapshot(self) -> Snapshot:
        return snapshot_from_services(catalog(*self.entries))

    def health(self) -> dict[str, Any]:
        return {"ok": True}


def web(n: int, status: str = "passing") -> dict[str, Any]:
    """Service `svc-<n>`: one instance, on b<n> at 192.0.2.<n + 10>, claiming VIP 198.51.100.<n + 1>:80."""
    return health_entry(f"svc-{n}", f"b{n}", f"192.0.2.{n + 10}", 80, [f"maglev.vip=198.51.100.{n + 1}:80"],
                        status=status)


def shadow_agent(tmp_path, source: Catalog) -> Agent:
    config = replace(CONFIG, dataplane="shadow", local_address="192.0.2.1", state_file=str(tmp_path / "state.json"),
                     link_prefix="mgltest")
    return Agent(DirectorReconciler(config), source)  # type: ignore[arg-type]


TABLE = 245
"""The announce table of `director()`'s BGP section."""


class Flaky(ShadowKernel):
    """A model kernel that refuses the operations `fails` picks."""

    def __init__(self, fails: type | None = None) -> None:
        super().__init__()
        self.fails = fails

    def apply(self, ops: Iterable[Op]) -> Iterator[OpResult]:
        for result in super().apply(ops):
            if self.fails is not None and isinstance(result.op, self.fails):
                yield OpResult(result.op, "EIO")
            else:
                yield result


def director_config(tmp_path) -> Config:
    return replace(CONFIG, local_address="192.0.2.1", state_file=str(tmp_path / "state.json"), link_prefix="mgltest",
                   http_bind=f"127.0.0.1:{free_port()}", bgp=BgpConfig(TABLE, str(tmp_path / "maintenance")))


def director(tmp_path, source: Catalog, dataplane: ShadowKernel | None = None, **changes) -> Agent:
    """A director agent on a model kernel; `changes` to its configuration."""
    reconciler = DirectorReconciler(replace(director_config(tmp_path), **changes))
    reconciler.dataplane = dataplane if dataplane is not None else ShadowKernel()
    return Agent(reconciler, source)  # type: ignore[arg-type]


def scrape(agent: Any) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The agent's /metrics as Prometheus reads it: sample name -> (labels, value) of each sample."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(agent.metrics.exposition().decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found
