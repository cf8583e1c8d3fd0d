"""Fixtures of the kernel tests (the test bed itself is tests/harness/; read tests/harness/README.md first).

Every test here needs IPVS, fou and ipip, so it runs inside the VM that ``python -m tests.vm.boot`` boots;
outside it every test here is skipped with a reason, inside it nothing is (a missing module is a failure).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.netns import Bed, Netns, in_vm
from tests.harness.topology import Topology
from tests.vm.boot import REQUIRED_MODULES

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session", autouse=True)
def kernel_vm() -> None:
    if not in_vm():
        pytest.skip("kernel test: runs only inside the test VM "
                    "(.venv/bin/python -m tests.vm.boot -- .venv/bin/pytest -m kernel tests/kernel)")
    if os.geteuid() != 0:
        pytest.fail("kernel tests must run as root (the VM runs them as root)")
    loaded = {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}
    missing = [m for m in REQUIRED_MODULES if m not in loaded]
    if missing:
        pytest.fail(f"kernel modules not loaded: {missing} (tests/vm/boot.py loads them)")


@pytest.fixture
def _bed() -> Iterator[Bed]:
    bed = Bed()
    try:
        yield bed
    finally:
        bed.teardown()


@pytest.fixture
def topology(_bed: Bed) -> Callable[..., Topology]:
    def make(directors: int = 1, backends: int = 2, clients: int = 1, routed: bool = False) -> Topology:
        return Topology(_bed, directors, backends, clients, routed)

    return make


@pytest.fixture
def netns(_bed: Bed) -> Callable[[str], Netns]:
    def make(tag: str = "ns") -> Netns:
        ns = Netns(f"mb{secrets.token_hex(3)}-{tag}", _bed)
        _bed.add_netns(ns.name)
        return ns

    return make
