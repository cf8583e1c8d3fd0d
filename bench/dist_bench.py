"""Start cost of the agent's build (`make dist`) against the same code installed in the virtualenv, in one run.

    .venv/bin/python bench/dist_bench.py [--artifact dist/maglev-bridge-...pyz] [--runs 5]

Without --artifact it builds one (scripts/dist.py) into a temporary directory. Each figure is the CPU time
(user + system) of `maglev-bridge --help` in a child process, best of --runs: wall time on a shared machine
mostly measures the neighbours. "first start" unpacks the zipapp into an empty SHIV_ROOT, as every new
allocation does; "warm" starts from the unpacked copy, as a restarted task does.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def cpu_seconds(command: list[str], env: dict[str, str] | None = None) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, help="a built .pyz (default: build one now)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="maglev-dist-bench-") as tmp:
        artifact = args.artifact
        if artifact is None:
            out = subprocess.run([sys.executable, str(REPO / "scripts/dist.py"), "--out", tmp],
                                 check=True, capture_output=True, text=True).stdout
            artifact = Path(out.split(" (")[0])
        root = Path(tmp) / "shiv"
        env = {**os.environ, "SHIV_ROOT": str(root)}
        installed = [str(Path(sys.executable).parent / "maglev-bridge"), "--help"]
        built = [PYTHON, "-I", str(artifact), "--help"]
        baseline = min(cpu_seconds(installed) for _ in range(args.runs))

        def first() -> float:
            shutil.rmtree(root, ignore_errors=True)
            return cpu_seconds(built, env)

        first_start = min(first() for _ in range(args.runs))
        warm = min(cpu_seconds(built, env) for _ in range(args.runs))
        unpacked = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        print(f"artifact {artifact.name}: {artifact.stat().st_size / 1e6:.1f} MB, unpacked {unpacked / 1e6:.0f} MB")
        print(f"--help CPU time, best of {args.runs}: installed in the virtualenv {baseline:.2f} s (baseline)")
        print(f"  artifact, first start (unpacks): {first_start:.2f} s = {first_start / baseline:.2f}x")
        print(f"  artifact, warm:                  {warm:.2f} s = {warm / baseline:.2f}x")


if __name__ == "__main__":
    main()
