"""The agent's own passes, replayed in this process on a fixed catalog: the first full pass, a periodic full
re-sync with nothing to change, and the small pass after one health change. Used by consul_latency.py (on
the host, shadow mode) and apply_bench.py (inside the VM, on the real kernel), so both time the same code
the running agent executes (`Agent.sync`), not a reconstruction of it.
"""

from __future__ import annotations

import cProfile
import io
import logging
import os
import pstats
import random
import statistics
import time
from typing import Any

from bridge.agent.director import DirectorReconciler
from bridge.agent.shell import Agent
from bridge.catalog.consul_format import snapshot_from_services
from bridge.core.config import Config
from bridge.core.model import Instance, Snapshot


class StaticSource:
    """What ConsulSource.snapshot() hands over: unchanged services keep their very Instance objects."""

    def __init__(self, entries: dict[str, list[dict[str, Any]]]) -> None:
        self.entries = entries
        self.names = sorted(entries)
        self.cached: dict[str, tuple[Instance, ...]] = {n: self._instances(n) for n in self.names}

    def _instances(self, name: str) -> tuple[Instance, ...]:
        return snapshot_from_services({name: self.entries[name]}).instances

    def snapshot(self) -> Snapshot:
        return Snapshot(tuple(i for name in self.names for i in self.cached[name]))

    def health(self) -> dict[str, Any]:
        return {}

    def flip(self, rng: random.Random) -> None:
        """One instance's own check goes critical, or back to passing."""
        name = rng.choice(self.names)
        entry = rng.choice(self.entries[name])
        for check in entry["Checks"]:
            if check["ServiceID"]:
                check["Status"] = "critical" if check["Status"] == "passing" else "passing"
        self.cached[name] = self._instances(name)


def replay(config: Config, entries: dict[str, list[dict[str, Any]]], changes: int = 30,
           profile: bool = False) -> tuple[dict[str, float], str]:
    """Median wall time of each kind of pass (ms), and a cProfile of `changes` more small passes."""
    source = StaticSource(entries)
    logger = logging.getLogger("maglev-bridge")
    sink = open(os.devnull, "w")  # noqa: SIM115
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    agent = Agent(DirectorReconciler(config), source)  # type: ignore[arg-type]
    timings: dict[str, list[float]] = {}

    def timed(label: str, full: bool) -> None:
        t0 = time.perf_counter()
        outcome = agent.sync(label, full=full)
        timings.setdefault(label, []).append(time.perf_counter() - t0)
        if outcome is None or outcome.failed:
            raise SystemExit(f"{label}: {agent.record.last_error or [s for s in outcome.steps if s.error][:3]}")

    timed("first full pass (builds all)", True)
    for _ in range(3):
        timed("full re-sync (nothing to change)", True)
    rng = random.Random(5)
    for _ in range(changes):
        source.flip(rng)
        timed("small pass after one health change", False)
    text = ""
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(changes):
            source.flip(rng)
            agent.sync("profile", full=False)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumtime").print_stats(16)
        text = out.getvalue()
    agent.close_dataplane()
    logger.removeHandler(handler)
    sink.close()
    return {k: 1000 * statistics.median(v) for k, v in timings.items()}, text
