"""Cost of one /metrics scrape of a director holding 2,000 virtual services x 20 real servers (shadow mode:
the same collector code, the table read from the agent's model instead of netlink), against a baseline in the
same run: the same per-real-server series formatted as plain text lines, the way node_exporter's IPVS
collector writes them (no library, no fingerprints). Prints the scrape's time and size and their ratios.

    .venv/bin/python bench/metrics_bench.py        # BENCH_VIPS / BENCH_BACKENDS to change the size
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.agent_passes import StaticSource  # noqa: E402
from bridge.agent import Agent  # noqa: E402
from bridge.dataplane.state import LiveService  # noqa: E402
from bridge.metrics import BACKEND_COUNTERS  # noqa: E402
from tests.catalog_builder import health_entry  # noqa: E402
from tests.test_diff import CONFIG  # noqa: E402

VIPS = int(os.environ.get("BENCH_VIPS", 2000))
BACKENDS = int(os.environ.get("BENCH_BACKENDS", 20))
ROUNDS = 5


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
            lines += [f"maglev_bridge_ipvs_backend_connections_active{labels} {rs.active_conns}",
                      f"maglev_bridge_ipvs_backend_connections_inactive{labels} {rs.inactive_conns}",
                      f"maglev_bridge_ipvs_backend_weight{labels} {rs.weight}",
                      f"maglev_bridge_ipvs_backend_desired_weight{labels} {rs.weight}"]
            lines += [f"maglev_bridge_ipvs_backend_{name}{labels} {getattr(rs.stats, field)}"
                      for name, field, _ in BACKEND_COUNTERS]
    return ("\n".join(lines) + "\n").encode()


def timed(work, rounds: int = ROUNDS) -> tuple[float, bytes]:  # type: ignore[no-untyped-def]
    times, out = [], b""
    for _ in range(rounds):
        start = time.perf_counter()
        out = work()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    logging.getLogger("maglev-bridge").setLevel(logging.WARNING)
    with TemporaryDirectory() as tmp:
        config = replace(CONFIG, dataplane="shadow", local_address="192.0.2.1", state_file=f"{tmp}/state.json")
        agent = Agent(config, StaticSource(catalog()))  # type: ignore[arg-type]
        start = time.perf_counter()
        agent.sync("start", full=True)
        full_pass = time.perf_counter() - start
        services = agent.shadow_services()
        assert services is not None
        real_servers = sum(len(s.real_servers) for s in services)
        first, _ = timed(agent.metrics.exposition, rounds=1)
        scrape, text = timed(agent.metrics.exposition)
        base, base_text = timed(lambda: plain(services))
        agent.close_dataplane()
    print(f"director: {len(services)} virtual services, {real_servers} real servers (full pass {full_pass:.2f} s)")
    print(f"baseline (plain node_exporter-style lines, per-real-server series only): {base * 1000:.0f} ms, "
          f"{len(base_text) / 1e6:.1f} MB")
    print(f"/metrics first scrape (fingerprints computed): {first * 1000:.0f} ms = {first / base:.1f}x baseline")
    print(f"/metrics later scrapes (median of {ROUNDS}): {scrape * 1000:.0f} ms = {scrape / base:.1f}x baseline, "
          f"{len(text) / 1e6:.1f} MB = {len(text) / len(base_text):.2f}x baseline, "
          f"{len(text) / real_servers:.0f} bytes per real server")


if __name__ == "__main__":
    main()
