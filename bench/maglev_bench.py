"""Speed of bridge.core.maglev against the straightforward pure-Python port of ip_vs_mh.c, in one run.

    .venv/bin/python bench/maglev_bench.py [--servers 1000] [--size 131071] [--flows 1000000]

Every figure is the best of several runs (wall clock), so background load inflates both sides alike;
compare the ratios rather than the absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.core.maglev import (
    Dest,
    _populate_sequentially,
    address_key,
    build_table,
    dest_hashes,
    lookup,
    lookup_many,
    turns,
)
from tests import maglev_reference as ref

T = TypeVar("T")


def best(runs: int, fn: Callable[[], T]) -> tuple[float, T]:
    """Fastest of `runs` calls, in seconds, with the last result."""
    fastest = float("inf")
    result: T
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest, result


def servers(count: int, rng: random.Random, weighted: bool) -> list[Dest]:
    addresses = rng.sample(range(0x0A000001, 0x0AFFFFFF), count)
    return [
        Dest.added(f"{a >> 24}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}", 8080, rng.randint(1, 100) if weighted else 1)
        for a in addresses
    ]


def bench_build(dests: list[Dest], size: int, label: str) -> None:
    naive_s, naive = best(2, lambda: ref.populate(dests, size))
    offsets, skips = dest_hashes(dests, size)
    claims = turns([d.last_weight for d in dests], size)
    offsets_list, skips_list = offsets.tolist(), skips.tolist()
    tight_s, _ = best(2, lambda: _populate_sequentially(offsets_list, skips_list, claims, size))
    first_s, _ = best(1, lambda: build_table(dests, size))  # includes numba's compilation for big tables
    ours_s, table = best(5, lambda: build_table(dests, size))
    assert table.slots.tolist() == naive, "bridge.core.maglev disagrees with the kernel port"
    print(f"build {label}: {len(dests)} servers, {size} slots")
    print(f"  straightforward port of ip_vs_mh.c  {naive_s * 1e3:8.1f} ms")
    print(f"  tightened claim-by-claim loop       {tight_s * 1e3:8.1f} ms   ({naive_s / tight_s:4.1f}x)")
    print(f"  build_table                         {ours_s * 1e3:8.1f} ms   ({naive_s / ours_s:4.1f}x the port, "
          f"{tight_s / ours_s:4.1f}x the tightened loop; first call {first_s * 1e3:.0f} ms)")


def bench_lookup(dests: list[Dest], size: int, flows: int, rng: random.Random) -> None:
    drained = [d.with_weight(0) if i % 10 == 0 else d for i, d in enumerate(dests)]
    table = build_table(drained, size)
    slots = table.slots.tolist()
    sample = [(f"198.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}", rng.randrange(65536))
              for _ in range(2000)]  # fmt: skip
    print(f"lookup: {len(dests)} servers, every tenth drained to weight 0, mh-port + mh-fallback")

    def naive_all() -> list[int | None]:
        return [ref.schedule(drained, slots, a, p, mh_port=True, mh_fallback=True) for a, p in sample]

    def ours_all() -> list[int | None]:
        found = (lookup(table, a, p, mh_port=True, mh_fallback=True) for a, p in sample)
        return [c.dest_index if c else None for c in found]

    naive_s, expected = best(2, naive_all)
    ours_s, got = best(3, ours_all)
    assert got == expected, "lookup disagrees with the kernel port"
    print(f"  kernel port, one flow               {naive_s / len(sample) * 1e6:8.2f} us")
    print(f"  lookup, one flow                    {ours_s / len(sample) * 1e6:8.2f} us")

    keys = np.array([rng.getrandbits(32) for _ in range(flows)], dtype=np.uint64)
    ports = np.array([rng.randrange(65536) for _ in range(flows)], dtype=np.uint64)
    many_s, result = best(3, lambda: lookup_many(table, keys, ports, mh_port=True, mh_fallback=True))
    check = [address_key(a) for a, _ in sample[:200]]
    spot = lookup_many(table, np.array(check, dtype=np.uint64), np.array([p for _, p in sample[:200]]),
                       mh_port=True, mh_fallback=True)  # fmt: skip
    assert spot.tolist() == [-1 if e is None else e for e in expected[:200]]
    print(f"  lookup_many, {flows} flows         {many_s * 1e3:8.1f} ms   "
          f"({many_s / flows * 1e9:.0f} ns/flow, {np.count_nonzero(result < 0)} dropped)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--size", type=int, default=131071)
    parser.add_argument("--flows", type=int, default=1_000_000)
    args = parser.parse_args()
    rng = random.Random(2024)
    dests = servers(args.servers, rng, weighted=False)
    bench_build(dests, args.size, "equal weights")
    bench_build(servers(args.servers, rng, weighted=True), args.size, "weights 1..100")
    bench_build(servers(50, rng, weighted=False), 4093, "Debian default size")
    bench_lookup(dests, args.size, args.flows, rng)


if __name__ == "__main__":
    main()
