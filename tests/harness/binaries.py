"""Where the real Consul, Nomad and Prometheus binaries come from: the project's build scripts.

``scripts/build-hashicorp.sh`` honours $CONSUL_BIN / $NOMAD_BIN, the PATH, then its cache, and builds from
the Go module only when none has it; ``scripts/build-prometheus.sh`` takes $PROMETHEUS_BIN, the PATH if that
build has Consul discovery, its cache, else a build (``promtool`` is beside it).  A failed build fails the test
(it is not skipped): these tests exist to run for real.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-hashicorp.sh"
PROMETHEUS_SCRIPT = REPO / "scripts" / "build-prometheus.sh"


def hashicorp_binary(name: str) -> str:
    """Locate or build ``consul``/``nomad`` via scripts/build-hashicorp.sh; the path."""
    return built_binary(BUILD_SCRIPT, name)


def built_binary(script: Path, *args: str) -> str:
    """The path the build script prints last; a failed build fails the test."""
    proc = subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f"{script.name} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}",
            pytrace=False,
        )
    return lines[-1]
