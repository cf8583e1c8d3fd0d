"""Fixtures that start real Consul / Nomad agents and find Prometheus (the harnesses are in tests/harness/).

* ``consul_binary`` / ``nomad_binary`` / ``prometheus_binary`` (session): paths from the build scripts
  (tests/harness/binaries.py); ``promtool`` is beside ``prometheus``.
* ``consul_agent`` (function): a fresh ``consul agent -dev`` per test, so KV, catalog and the agent's ports
  never leak between tests; it starts in well under a second.  Tests may ``restart()``/``stop()`` it freely.
* ``consul_agent_persistent`` (function): same, with raft on disk, for tests that need KV/catalog to survive
  ``restart()``.
* ``nomad_cluster`` (session): 1 server + 4 clients, several seconds to start, so shared.  Its Consul server
  agent (``nomad_cluster.consul``) is also session-wide; tests must clean up the jobs they submit.
  ``NomadCluster.stop()`` at the end kills anything left.

Hypothesis runs without its per-example time limit (``deadline``), everywhere: timing is measured by the
benches under bench/, never asserted by tests, and on a loaded machine or inside the emulated VM one example
of a property test took 359 ms against hypothesis's default 200 ms and failed a run that was otherwise
green. Its `too_slow` health check (data generation slower than it likes) is off for the same reason.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.harness.binaries import PROMETHEUS_SCRIPT, built_binary, hashicorp_binary
from tests.harness.consul_agent import ConsulAgent
from tests.harness.nomad_cluster import NomadCluster

settings.register_profile("maglev-bridge", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("maglev-bridge")


@pytest.fixture(scope="session")
def consul_binary() -> str:
    return hashicorp_binary("consul")


@pytest.fixture(scope="session")
def nomad_binary() -> str:
    return hashicorp_binary("nomad")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return built_binary(PROMETHEUS_SCRIPT)


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
