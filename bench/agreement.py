"""Do directors agree, and how much does one backend leaving disturb?  Figures from the Maglev model.

    .venv/bin/python bench/agreement.py [--seeds 30] [--flows 100000]

(a) Agreement.  One random catalog history (registrations, deregistrations, re-registrations, weight
changes, health flaps) is fed to three directors with different timing: one sees every event, one starts
at the end, one is down for a stretch in the middle and restarted (keeping its kernel; in a second variant
it also loses its state file).  Each runs either the agent's planner (`compute_desired` + `plan`) or a
naive strategy (add real servers in catalog order, critical ones at weight 0, edit weights in place,
delete on deregistration, no order rule), on a simulated kernel list (tests/harness/fake_kernel.py).  Each
director's table is built with `bridge.core.maglev` from its final list and remembered weights; the figure is
the share of random flows that all three send to the same real server (a drop everywhere counts as
agreeing), at the last event (drains still pending) and settled (after the drain timeout).

(b) Disruption.  N equally weighted backends, one leaves: the share of flows that change real server
while it drains (weight 0 with mh-fallback), when it is then deleted, and in all, against the ideal 1/N;
"collateral" counts the flows that moved although they were not on the leaving backend.

Asserts nothing: tests/kernel/test_maglev_exact.py proves the model exact against the kernel.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.catalog.consul_format import snapshot_from_services
from bridge.core.desired import compute_desired
from bridge.core.keys import DestKey
from bridge.core.maglev import DEFAULT_TABLE_SIZE, Dest, MaglevTable, address_key, build_table, lookup_many
from bridge.core.memory import Memory
from bridge.core.ops import AddDest, AddService, DelDest, Op, SetDest
from tests.catalog_builder import catalog
from tests.harness.fake_kernel import FakeDirector, FakeKernel
from tests.harness.web import CONFIG, KEY, entry

Entries = list[dict[str, Any]]
Routes = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
SPACING = 5.0
"""Seconds between catalog events; the drain timeout (CONFIG) is 30 s, so drains end inside the history."""
FLAGS = ("mh-fallback", "mh-port")
"""The agent's default service flags, also the naive strategy's."""


def routes(table: MaglevTable, flags: Sequence[str], keys: U64, ports: U64) -> Routes:
    """Per flow, the address key of the real server it reaches, -1 where it is dropped."""
    picks = lookup_many(table, keys, ports, mh_port="mh-port" in flags, mh_fallback="mh-fallback" in flags)
    owners = np.array([address_key(d.address) for d in table.dests] + [-1], dtype=np.int64)
    return owners[picks]


# --------------------------------------------------------------------------------------------- (a) agreement


def catalog_history(rng: random.Random, backends: int = 20, events: int = 60) -> list[Entries]:
    """The catalog after each event.  Node names sort like their numbers, so catalog order is node order."""
    nodes = range(11, 11 + backends)
    registered: dict[int, dict[str, Any]] = {}
    index = 1000
    states = []
    kinds, odds = ("register", "deregister", "reregister", "flap", "weight"), (6, 3, 2, 5, 4)
    for _ in range(events):
        absent = [n for n in nodes if n not in registered]
        kind = rng.choices(kinds, odds)[0] if registered else "register"
        if kind == "register" and absent:
            index += 1
            registered[rng.choice(absent)] = {"index": index, "status": rng.choice(["passing"] * 4 + ["critical"]),
                                              "weight": rng.choice([1, 1, 2, 3])}
        elif kind == "deregister":
            del registered[rng.choice(sorted(registered))]
        elif kind == "reregister":
            index += 1
            n = rng.choice(sorted(registered))
            registered[n] = {**registered[n], "index": index, "status": "passing"}
        elif kind == "weight":
            n = rng.choice(sorted(registered))
            registered[n] = {**registered[n], "weight": rng.choice([0, 1, 2, 3, 5])}
        else:
            n = rng.choice(sorted(registered))
            registered[n] = {**registered[n], "status": rng.choice(["passing", "critical", "warning"])}
        states.append([entry(n, status=v["status"], weight=v["weight"], index=v["index"])
                       for n, v in sorted(registered.items())])
    return states


class Naive:
    """What a straightforward agent does: no order rule, no remembered weights, no drain."""

    def __init__(self) -> None:
        self.kernel = FakeKernel()

    def sync(self, entries: Entries, now: float = 0.0) -> None:
        desired = compute_desired(snapshot_from_services(catalog(*entries)), CONFIG, "192.0.2.1")
        by_backend = {rs.backend: rs for vs in desired.virtual_services for rs in vs.real_servers}
        addresses = [e["Service"]["Address"] for e in entries]
        in_catalog_order = [by_backend[a] for a in addresses if a in by_backend]
        service = self.kernel.services.get(KEY)
        ops: list[Op] = [] if service else [AddService(KEY, "mh", FLAGS)]
        live = {r.address: r for r in service.real_servers} if service else {}
        for rs in in_catalog_order:
            if rs.address not in live:
                ops.append(AddDest(KEY, rs.address, rs.port, rs.weight))
            elif live[rs.address].weight != rs.weight:
                ops.append(SetDest(KEY, rs.address, rs.port, rs.weight))
        wanted = {rs.address for rs in in_catalog_order}
        ops += [DelDest(KEY, r.address, r.port) for r in live.values() if r.address not in wanted]
        self.kernel.run(ops)


def agent() -> FakeDirector:
    """The agent's passes on the fake kernel (tests/harness/fake_kernel.py)."""
    return FakeDirector(CONFIG)


Strategy = Callable[[], FakeDirector | Naive]


def restart(director: FakeDirector | Naive, keep_state: bool) -> FakeDirector | Naive:
    """A new process on the same kernel; the agent keeps its state file, or has lost it."""
    fresh = agent() if isinstance(director, FakeDirector) else Naive()
    fresh.kernel = director.kernel
    if isinstance(director, FakeDirector) and isinstance(fresh, FakeDirector):
        fresh.memory = replace(director.memory) if keep_state else Memory()
    return fresh


def kernel_routes(kernel: FakeKernel, keys: U64, ports: U64) -> Routes:
    """The director's table from its list and the weights its kernel remembers, applied to the flows."""
    service = kernel.services.get(KEY)
    listed = service.real_servers if service else ()
    dests = [Dest(r.address, r.port, r.weight, kernel.last_weight[DestKey(KEY, r.address, r.port)]) for r in listed]
    return routes(build_table(dests, DEFAULT_TABLE_SIZE), service.flags if service else FLAGS, keys, ports)


def agreement(trio: Sequence[FakeDirector | Naive], keys: U64, ports: U64) -> float:
    a, b, c = (kernel_routes(d.kernel, keys, ports) for d in trio)
    return float(np.mean((a == b) & (b == c)))


def scenario(history: list[Entries], strategy: Strategy, keep_state: bool, keys: U64,
             ports: U64) -> tuple[float, float]:
    """Agreement of watcher, late starter and restarted director: at the last event, and settled."""
    watcher, restarted = strategy(), strategy()
    down = range(len(history) // 3, len(history) // 2)
    for t, entries in enumerate(history):
        watcher.sync(entries, now=t * SPACING)
        if t in down:
            continue
        if t == down.stop:
            restarted = restart(restarted, keep_state)
        restarted.sync(entries, now=t * SPACING)
    last = (len(history) - 1) * SPACING
    late = strategy()
    late.sync(history[-1], now=last)
    trio = (watcher, late, restarted)
    at_last_event = agreement(trio, keys, ports)
    settled_at = last + CONFIG.drain_timeout + 1
    for director in trio:
        director.sync(history[-1], now=settled_at)
        director.sync(history[-1], now=settled_at + 1)
    return at_last_event, agreement(trio, keys, ports)


def bench_agreement(seeds: int, flows: int) -> None:
    print(f"(a) agreement: 20 backends, 60 catalog events {SPACING:.0f} s apart (drain timeout "
          f"{CONFIG.drain_timeout:.0f} s), table {DEFAULT_TABLE_SIZE}, {flows:,} random flows (mh-port, mh-fallback)")
    print("    share of flows that watcher, late starter and restarted director send to the same real server")
    print("    restart variants: the agent keeps its state file (kept) or loses it (lost); naive keeps nothing")
    _row("seed", ["agent kept", "agent lost", "naive"] * 2)
    columns: list[list[float]] = [[] for _ in range(6)]
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        keys = rng.integers(0, 2**32, flows, dtype=np.uint64)
        ports = rng.integers(1024, 65536, flows, dtype=np.uint64)
        history = catalog_history(random.Random(seed))
        kept = scenario(history, agent, True, keys, ports)
        lost = scenario(history, agent, False, keys, ports)
        naive = scenario(history, Naive, True, keys, ports)
        row = [kept[0], lost[0], naive[0], kept[1], lost[1], naive[1]]
        for column, value in zip(columns, row, strict=True):
            column.append(value)
        _row(str(seed), [f"{v:.2%}" for v in row])
    for label, fold in (("mean", statistics.fmean), ("min", min)):
        _row(label, [f"{fold(c):.2%}" for c in columns])
    _row("100%", [f"{sum(v == 1.0 for v in c)} seeds" for c in columns])


def _row(label: str, cells: Sequence[str]) -> None:
    """One line: the label, then the three strategies at the last event and, after a bar, settled."""
    width = (11, 11, 9)
    last, settled = (" ".join(f"{c:>{w}}" for c, w in zip(half, width, strict=True)) for half in (cells[:3], cells[3:]))
    if label == "seed":
        print(f"    {'':>4}   {'at the last event':^33} | {'settled':^33}")
    print(f"    {label:>4}   {last} | {settled}")


# --------------------------------------------------------------------------------------------- (b) disruption


def bench_disruption(sizes: Sequence[int], counts: Sequence[int], flows: int, samples: int) -> None:
    rng = np.random.default_rng(2024)
    keys = rng.integers(0, 2**32, flows, dtype=np.uint64)
    ports = rng.integers(1024, 65536, flows, dtype=np.uint64)
    print(f"\n(b) disruption: one of N equally weighted backends leaves; share of {flows:,} flows that change real "
          "server (mh-port, mh-fallback)")
    print("    drain = weight 0 (mh-fallback re-hashes its flows), delete = removed after the drain, total = both;")
    print(f"    collateral = moved although not on the leaving backend; mean over up to {samples} leaving positions")
    print(f"    {'size':>6} {'N':>4} {'ideal 1/N':>10} {'its flows':>10} {'drain':>8} {'delete':>8} {'total':>8} "
          f"{'collateral':>11}")
    for size in sizes:
        for n in counts:
            started = time.perf_counter()
            dests = [Dest.added(f"203.0.113.{i + 1}", 80, 1) for i in range(n)]
            before = routes(build_table(dests, size), FLAGS, keys, ports)
            leaving = sorted(random.Random(n).sample(range(n), min(n, samples)))
            figures = []
            for i in leaving:
                gone = address_key(dests[i].address)
                drained = [*dests[:i], dests[i].with_weight(0), *dests[i + 1 :]]
                during = routes(build_table(drained, size), FLAGS, keys, ports)
                after = routes(build_table(dests[:i] + dests[i + 1 :], size), FLAGS, keys, ports)
                figures.append([np.mean(before == gone), np.mean(before != during), np.mean(during != after),
                                np.mean(before != after), np.mean((before != after) & (before != gone))])
            mean = np.mean(figures, axis=0)
            cells = " ".join(f"{v:>{w}.2%}" for v, w in zip(mean, (10, 8, 8, 8, 11), strict=True))
            print(f"    {size:>6} {n:>4} {1 / n:>10.2%} {cells}   ({time.perf_counter() - started:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=20, help="leaving positions per N in (b)")
    args = parser.parse_args()
    bench_agreement(args.seeds, args.flows)
    bench_disruption((DEFAULT_TABLE_SIZE, 65521), (5, 20, 100), args.flows, args.samples)


if __name__ == "__main__":
    main()
