"""pytest fixtures that start real Consul / Nomad agents.

Use them from a test module with::

    from tests.real.fixtures import consul_agent, consul_binary  # noqa: F401

(or list ``"tests.real.fixtures"`` in a root conftest's ``pytest_plugins``).

Scopes:

* ``consul_binary`` / ``nomad_binary`` (session): path from
  ``scripts/build-hashicorp.sh``, which honours $CONSUL_BIN / $NOMAD_BIN, the PATH,
  then its cache, and builds from the Go module only when none has it.  A failed
  build fails the test (it is not skipped): these tests exist to run for real.
* ``prometheus_binary`` (session): path from ``scripts/build-prometheus.sh`` (``$PROMETHEUS_BIN``,
  the PATH if that build has Consul discovery, its cache, else a build); ``promtool`` is beside it.
* ``consul_agent`` (function): a fresh ``consul agent -dev`` per test, so KV,
  catalog and the agent's ports never leak between tests; it starts in well under
  a second.  Tests may ``restart()``/``stop()`` it freely.
* ``consul_agent_persistent`` (function): same, with raft on disk, for tests that
  need KV/catalog to survive ``restart()``.
* ``nomad_cluster`` (session): 1 server + 4 clients, several seconds to start, so
  shared.  Its Consul server agent (``nomad_cluster.consul``) is also session-wide;
  tests must clean up the jobs they submit.  ``NomadCluster.stop()`` at the end
  kills anything left.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .consul_agent import ConsulAgent
from .nomad_cluster import NomadCluster

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-hashicorp.sh"


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


@pytest.fixture(scope="session")
def consul_binary() -> str:
    return hashicorp_binary("consul")


@pytest.fixture(scope="session")
def nomad_binary() -> str:
    return hashicorp_binary("nomad")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return built_binary(REPO / "scripts" / "build-prometheus.sh")


@pytest.fixture
def consul_agent(consul_binary: str) -> Iterator[ConsulAgent]:
    with ConsulAgent(consul_binary) as agent:
        yield agent


@pytest.fixture
def consul_agent_persistent(consul_binary: str) -> Iterator[ConsulAgent]:
    with ConsulAgent(consul_binary, persistent=True) as agent:
        yield agent


@pytest.fixture(scope="session")
def nomad_cluster(consul_binary: str, nomad_binary: str) -> Iterator[NomadCluster]:
    with (
        ConsulAgent(consul_binary, node_name="consul-server") as consul,
        NomadCluster(nomad_binary, consul) as cluster,
    ):
        yield cluster
