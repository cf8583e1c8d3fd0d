"""Cost of one /metrics scrape of a director holding 2,000 virtual services x 20 real servers (shadow mode:
the same collector code, the table read from the agent's model instead of netlink), against a baseline in the
same run: the same per-real-server series formatted as plain text lines, the way node_exporter's IPVS
collector writes them (no library, no fingerprints). Measures, in the same run, the scrape as it was with
prometheus_client formatting every family (the per-real-server ones built as metric families and written by
generate_latest, split into building and formatting) and as it is (bridge.inspect.metrics.backend_text for those).
CPU time of this process is the figure (the machine is shared); wall time beside it.

    .venv/bin/python bench/metrics_bench.py        # BENCH_VIPS / BENCH_BACKENDS to change the size
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TypeVar

from prometheus_client import generate_latest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.agent_passes import StaticSource  # noqa: E402
from bridge.agent.director import DirectorReconciler  # noqa: E402
from bridge.agent.shell import Agent  # noqa: E402
from bridge.core.live import LiveService  # noqa: E402
from bridge.inspect.metrics import BACKEND_FAMILIES, BACKEND_PREFIX, backend_text  # noqa: E402
from tests.catalog_builder import health_entry  # noqa: E402
from tests.harness.metrics_reference import reference_backend_families, reference_text  # noqa: E402
from tests.harness.web import CONFIG  # noqa: E402

VIPS = int(os.environ.get("BENCH_VIPS", 2000))
BACKENDS = int(os.environ.get("BENCH_BACKENDS", 20))
ROUNDS = 5
T = TypeVar("T")


def catalog() -> dict[str, list[dict]]:
    return {f"svc-{v:04d}": [
        health_entry(f"svc-{v:04d}", f"b{b:02d}", f"192.0.2.{100 + b}", 80,
                     [f"maglev.vip=198.51.100.{v % 250 + 1}:{80 + v // 250}"], create_index=1000 + v * 50 + b)
        for b in range(BACKENDS)] for v in range(VIPS)}


def plain(services: tuple[LiveService, ...]) -> bytes:
    """node_exporter-style text of the same dense per-real-server series: one formatted line per sample."""
    lines = []
    for s in services:
        for rs in s.real_servers:
            labels = (f'{{local_address="{s.vip}",local_port="{s.port}",proto="{s.protocol}",'
                      f'remote_address="{rs.address}",remote_port="{rs.port}"}}')
            stats = rs.stats
            lines += [f"{BACKEND_PREFIX}{suffix}{labels} {value}" for (suffix, _, _), value in zip(BACKEND_FAMILIES, (
                rs.active_conns, rs.inactive_conns, rs.weight, rs.weight, stats.connections, stats.packets_in,
                stats.packets_out, stats.bytes_in, stats.bytes_out), strict=True)]
    return ("\n".join(lines) + "\n").encode()


def timed(work: Callable[[], T], rounds: int = ROUNDS) -> tuple[float, float, T]:
    """Medians of CPU time and wall time over `rounds`, and the last result."""
    cpus, walls = [], []
    for _ in range(rounds):
        cpu, wall = time.process_time(), time.perf_counter()
        out = work()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return statistics.median(cpus), statistics.median(walls), out


def main() -> None:
    logging.getLogger("maglev-bridge").setLevel(logging.WARNING)
    with TemporaryDirectory() as tmp:
        config = replace(CONFIG, dataplane="shadow", local_address="192.0.2.1", state_file=f"{tmp}/state.json")
        agent = Agent(DirectorReconciler(config), StaticSource(catalog()))  # type: ignore[arg-type]
        start = time.perf_counter()
        agent.sync("start", full=True)
        full_pass = time.perf_counter() - start
        shadow = agent.shadow_state()
        assert shadow is not None
        services = shadow.services
        real_servers = sum(len(s.real_servers) for s in services)
        deadlines = dict(agent.memory.drain_deadlines)
        first, first_wall, _ = timed(agent.metrics.exposition, rounds=1)
        base, base_wall, base_text = timed(lambda: plain(services))
        build, _, families = timed(lambda: reference_backend_families(services, agent.desired, deadlines), rounds=2)
        write, write_wall, slow_dense = timed(lambda: reference_text(families), rounds=2)
        rest, _, _ = timed(lambda: generate_latest(agent.metrics.registry))
        dense, _, _ = timed(lambda: backend_text(services, agent.desired, deadlines))
        scrape, scrape_wall, text = timed(agent.metrics.exposition)
        agent.close_dataplane()
    assert text.endswith(slow_dense.encode()), "the scrape's per-real-server text is prometheus_client's"
    before = rest + build + write
    print(f"director: {len(services)} virtual services, {real_servers} real servers (full pass {full_pass:.2f} s)")
    print(f"baseline (plain node_exporter-style lines, per-real-server series only): {base * 1000:.0f} ms CPU "
          f"({base_wall * 1000:.0f} ms wall), {len(base_text) / 1e6:.1f} MB")
    print(f"before, prometheus_client for every family: per-real-server families built {build * 1000:.0f} ms CPU, "
          f"written by generate_latest {write * 1000:.0f} ms CPU ({write_wall * 1000:.0f} ms wall); "
          f"with the rest of the registry ({rest * 1000:.0f} ms CPU) a scrape of ~{before:.1f} s CPU = "
          f"{before / base:.1f}x baseline")
    print(f"now: the per-real-server families by backend_text {dense * 1000:.0f} ms CPU = "
          f"{(build + write) / dense:.0f}x less than building and writing them through prometheus_client "
          f"({(build + write) * 1000:.0f} ms)")
    print(f"/metrics first scrape (fingerprints computed): {first * 1000:.0f} ms CPU ({first_wall * 1000:.0f} ms wall)"
          f" = {first / base:.1f}x baseline")
    print(f"/metrics later scrapes (median of {ROUNDS}): {scrape * 1000:.0f} ms CPU ({scrape_wall * 1000:.0f} ms wall)"
          f" = {scrape / base:.1f}x baseline, {before / scrape:.1f}x faster than before; "
          f"{len(text) / 1e6:.1f} MB = {len(text) / len(base_text):.2f}x baseline, "
          f"{len(text) / real_servers:.0f} bytes per real server")


if __name__ == "__main__":
    main()
