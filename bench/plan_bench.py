"""Benchmark (issue: director, section 7a): `plan` on 2,000 VIPs x 50 backends (100,000 instances).

Prints wall time and peak memory of `maglev-bridge plan --format json` as ratios to merely loading the
same file with the standard json module, each in a fresh process in the same run (goal: at most 2x the
time and 1.5x the memory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.catalog_builder import health_entry  # noqa: E402

VIPS = int(os.environ.get("BENCH_VIPS", 2000))
BACKENDS = int(os.environ.get("BENCH_BACKENDS", 50))
NODES = 1000
RUNS = int(os.environ.get("BENCH_RUNS", 3))


def generate(path: Path) -> None:
    services = {}
    for v in range(VIPS):
        name = f"svc-{v:04d}"
        vip = f"198.51.{100 + v // 250}.{v % 250 + 1}"
        entries = []
        for b in range(BACKENDS):
            n = (v * 7 + b * 13) % NODES
            status = "critical" if (v + b) % 17 == 0 else "passing"
            entries.append(health_entry(name, f"node-{n:04d}", f"10.20.{n // 250}.{n % 250 + 1}", 8000 + b % 7,
                                        [f"maglev.vip={vip}:80", f"maglev.weight={1 + b % 3}", "team-x"],
                                        status=status, create_index=1000 + v * BACKENDS + b))
        services[name] = entries
    path.write_text(json.dumps(services))


def measure(argv: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (KiB) of one child process. CPU time is what
    to compare on a shared, loaded machine, where wall time mostly measures the neighbours."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{argv} failed with status {status}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss


def best(argv: list[str]) -> tuple[float, float, int]:
    runs = [measure(argv) for _ in range(RUNS)]
    return min(r[0] for r in runs), min(r[1] for r in runs), min(r[2] for r in runs)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "catalog.json"
        config = Path(tmp) / "config.yaml"
        generate(catalog)
        config.write_text("vip_cidrs: [198.51.96.0/20]\ntunnel_map: [{backend: 10.20.0.0/16, tunnel: 100.64.0.0/16}]\n"
                          "local_address: 192.0.2.1\n")
        size_mb = catalog.stat().st_size / 1e6
        load = best([sys.executable, "-c", f"import json; json.load(open({str(catalog)!r}))"])
        plan = best([sys.executable, "-m", "bridge.cli", "plan", "--format", "json", "--catalog", str(catalog),
                     "--config", str(config)])
    print(f"catalog: {VIPS} VIPs x {BACKENDS} backends = {VIPS * BACKENDS} instances, {size_mb:.1f} MB JSON")
    print(f"json.load alone   : {load[0]:6.2f} s wall  {load[1]:6.2f} s CPU  {load[2] / 1024:7.1f} MiB peak")
    print(f"maglev-bridge plan: {plan[0]:6.2f} s wall  {plan[1]:6.2f} s CPU  {plan[2] / 1024:7.1f} MiB peak")
    print(f"ratio time {plan[0] / load[0]:.2f}x wall, {plan[1] / load[1]:.2f}x CPU (goal <= 2x), "
          f"memory {plan[2] / load[2]:.2f}x (goal <= 1.5x)")


if __name__ == "__main__":
    main()
