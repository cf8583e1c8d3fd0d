"""The agent's own passes, replayed in this process on a fixed catalog: the first full pass, a periodic full
re-sync with nothing to change, and the small pass after one health change. Used by consul_latency.py (on
the host, shadow mode) and apply_bench.py (inside the VM, on the real kernel), so both time the same code
the running agent executes (`Agent.sync`), not a reconstruction of it.

Run on its own, it measures what the state file costs the passes at 2,000 services x 5 instances (shadow
mode, CPU time of this process): the agent's bookkeeping, which remembers only the weights of real servers at
weight 0 (bridge/core/memory.py), against the bookkeeping before it, every real server's weight (the
kernel's own rule over every real server, tests/harness/fake_kernel.py), in the same run, alternating:

    .venv/bin/python bench/agent_passes.py      # BENCH_VIPS / BENCH_BACKENDS / BENCH_ROUNDS
"""

from __future__ import annotations

import copy
import cProfile
import io
import logging
import os
import pstats
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.agent.director import DirectorReconciler
from bridge.agent.shell import Agent
from bridge.catalog.consul_format import snapshot_from_services
from bridge.core.config import Config
from bridge.core.keys import DestKey
from bridge.core.live import LiveService
from bridge.core.model import Instance, Snapshot
from bridge.core.ops import Op
from bridge.files.store import read_state


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
           profile: bool = False, clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, float], str]:
    """Median time of each kind of pass (ms; wall time, or CPU time with `clock=time.process_time`), and a
    cProfile of `changes` more small passes."""
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
        t0 = clock()
        outcome = agent.sync(label, full=full)
        timings.setdefault(label, []).append(clock() - t0)
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


# ---- on its own: the state file's cost, every real server's weight against only those at weight 0 --------------


def every_weight(last_weights: Mapping[DestKey, int], live: Iterable[LiveService],
                 ops: Iterable[Op]) -> Mapping[DestKey, int]:
    """The bookkeeping before, the baseline: every real server's remembered weight, moved by each operation as
    the kernel moves it; the same object when no operation moved one."""
    from tests.harness.fake_kernel import follow

    updated = dict(last_weights)
    changed = [follow(updated, op) for op in ops]
    return updated if any(changed) else last_weights


def catalog(vips: int, backends: int) -> dict[str, list[dict[str, Any]]]:
    """`vips` services of `backends` instances each (a VIP per 8 ports), one instance in 17 critical."""
    from tests.catalog_builder import health_entry

    return {f"svc-{v:04d}": [
        health_entry(f"svc-{v:04d}", f"b{b:02d}", f"192.0.2.{100 + b}", 80,
                     [f"maglev.vip=198.51.100.{v % 250 + 1}:{80 + v // 250}"], create_index=1000 + v * 50 + b,
                     status="critical" if (v + b) % 17 == 0 else "passing")
        for b in range(backends)] for v in range(vips)}


def timed_calls(function: Callable[..., Any], spent: list[float]) -> Callable[..., Any]:
    """`function`, adding the CPU time of each call to `spent`."""
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent.append(time.process_time() - start)
    return timed


def main() -> None:
    """Whole passes are too noisy on a shared machine to show a millisecond, so the bookkeeping (`remember`)
    and the state file's write (`save_state`, once per pass) are timed on their own as well, inside the
    same passes."""
    from bridge.core.memory import remember
    from bridge.files.store import save_state
    from tests.harness.web import CONFIG

    vips = int(os.environ.get("BENCH_VIPS", 2000))
    backends = int(os.environ.get("BENCH_BACKENDS", 5))
    rounds = int(os.environ.get("BENCH_ROUNDS", 2))
    changes = 60
    entries = catalog(vips, backends)
    kinds = {"before": every_weight, "now": remember}
    passes: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    memory: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    files: dict[str, tuple[int, int, float]] = {}
    with TemporaryDirectory() as tmp:
        for n in range(rounds):
            for kind, bookkeeping in kinds.items():
                path = Path(tmp) / f"state-{n}-{kind}.json"
                config = replace(CONFIG, dataplane="shadow", local_address="192.0.2.1", state_file=str(path))
                spent: list[float] = []
                with mock.patch("bridge.agent.reconcile.remember", timed_calls(bookkeeping, spent)), \
                        mock.patch("bridge.agent.state_file.save_state", timed_calls(save_state, spent)):
                    medians, _ = replay(config, copy.deepcopy(entries), changes=changes, clock=time.process_time)
                passes[kind].append(medians)
                per_pass = [a + b for a, b in zip(spent[::2], spent[1::2], strict=True)]
                memory[kind].append({label: 1000 * statistics.median(part) for label, part in zip(
                    medians, (per_pass[:1], per_pass[1:4], per_pass[4:]), strict=True)})
                start = time.process_time()
                stored = read_state(path)
                files[kind] = (len(stored.memory.last_weights), path.stat().st_size, time.process_time() - start)
    critical = sum(1 for v in entries.values() for e in v if e["Checks"][-1]["Status"] == "critical")
    print(f"agent passes (Agent.sync, shadow mode), {vips} services x {backends} instances = {vips * backends} real "
          f"servers, {critical} at weight 0 at start; remembered weights of every real server (before) or of those at "
          f"weight 0 (now); CPU ms per pass, best of {rounds} rounds' medians ({changes} small passes a round)")
    print(f"  {'':<36}{'whole pass':>22}{'bookkeeping + state file write':>36}")
    print(f"  {'':<36}{'before':>10}{'now':>12}{'before':>14}{'now':>10}{'saved':>12}")
    for label in passes["before"][0]:
        whole = [min(r[label] for r in passes[kind]) for kind in kinds]
        part = [min(r[label] for r in memory[kind]) for kind in kinds]
        print(f"  {label:<36}{whole[0]:10.2f}{whole[1]:12.2f}{part[0]:14.2f}{part[1]:10.2f}{part[0] - part[1]:12.2f}")
    (old_keys, old_size, old_read), (new_keys, new_size, new_read) = files["before"], files["now"]
    print(f"  state file at the end: {old_keys} remembered weights, {old_size} bytes before; {new_keys}, {new_size} "
          f"bytes now ({old_size / new_size:.1f}x smaller); reading it (start, apply): {1000 * old_read:.1f} ms CPU "
          f"before, {1000 * new_read:.1f} ms now")


if __name__ == "__main__":
    main()
