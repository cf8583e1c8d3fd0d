"""The shadow data plane with the kernel's last_weight bookkeeping added, for fast unit tests of the planner.

ShadowKernel models the list semantics the planner relies on (a new real server goes to the head of the
list); this adds what the kernel remembers for every real server and never reports, by the kernel's rule
(ip_vs_ctl.c: last_weight is set on add, and on edits to a non-zero weight), written here apart from the
agent's own bookkeeping (bridge.core.memory.remember, which keeps only what the kernel cannot report) so
that tests can check one against the other. The real kernel tests confirm the rule
(tests/kernel/test_maglev_exact.py). `FakeDirector` runs the agent's passes on one: plan, apply, remember.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

from bridge.catalog.consul_format import snapshot_from_services
from bridge.core.config import Config
from bridge.core.desired import compute_desired
from bridge.core.encap import Forwarding
from bridge.core.keys import DestKey, ServiceKey
from bridge.core.memory import Memory, remember
from bridge.core.model import DesiredState
from bridge.core.ops import AddDest, DelDest, DelService, Op, Scope, SetDest
from bridge.core.plan import Plan, plan
from bridge.dataplane.shadow import ShadowKernel
from tests.catalog_builder import catalog

LOCAL_ADDRESS = "192.0.2.1"


def follow(last_weight: MutableMapping[DestKey, int], op: Op) -> bool:
    """Every real server's last_weight after `op` succeeded, by the kernel's rule (ip_vs_ctl.c: set on add, and
    on edits to a non-zero weight; gone with the real server or its service). True when it changed."""
    if isinstance(op, AddDest) or (isinstance(op, SetDest) and op.weight != 0):
        key = DestKey(op.key, op.address, op.port)
        changed = last_weight.get(key) != op.weight
        last_weight[key] = op.weight
        return changed
    if isinstance(op, DelDest):
        return last_weight.pop(DestKey(op.key, op.address, op.port), None) is not None
    if isinstance(op, DelService):
        gone = [k for k in last_weight if k.service == op.key]
        for key in gone:
            del last_weight[key]
        return bool(gone)
    return False


class FakeKernel(ShadowKernel):
    def __init__(self) -> None:
        super().__init__()
        self.last_weight: dict[DestKey, int] = {}
        self.ops_run = 0

    def run(self, ops: Iterable[Op]) -> None:
        """Apply `ops`, failing the test on any operation the kernel would refuse."""
        for result in self.apply(ops):
            assert result.error is None, f"{result.op.describe()}: {result.error}"
            self.ops_run += 1
            follow(self.last_weight, result.op)

    def table_state(self) -> list[tuple[str, tuple[tuple[str, int, int], ...]]]:
        """What ip_vs_mh builds its table from: list order and each real server's last_weight."""
        return [
            (f"{k}", tuple((r.address, r.weight, self.last_weight[DestKey(k, r.address, r.port)])
                           for r in s.real_servers))
            for k, s in sorted(self.services.items())
        ]


class FakeDirector:
    """One director's passes without Consul or a kernel: the catalog's desired state, planned against a
    FakeKernel, run on it, and the memory (drain deadlines, remembered weights) the agent keeps in its state
    file carried to the next pass, as `bridge.agent.director` does. The planner tests drive it through catalog
    histories and compare what two of them leave in their kernels."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.kernel = FakeKernel()
        self.memory = Memory()

    def desired(self, entries: Iterable[dict[str, Any]]) -> DesiredState:
        """The desired state of a catalog of these health entries (tests/catalog_builder.py)."""
        return compute_desired(snapshot_from_services(catalog(*entries)), self.config, LOCAL_ADDRESS)

    def sync(self, entries: Iterable[dict[str, Any]], now: float = 0.0, scope: Scope = None) -> Plan:
        """One pass (a small one with a `scope`): plan, run, remember."""
        live = self.kernel.read(scope)
        p = plan(self.desired(entries), live, self.memory, now, self.config.drain_timeout, scope)
        self.kernel.run(p.ops)
        self.memory = Memory(p.drain_deadlines, remember(self.memory.last_weights, live.services, p.ops))
        return p

    def dests(self, key: ServiceKey) -> list[tuple[str, int, Forwarding]]:
        """The kernel's real servers of `key` in list order: address, weight, forwarding."""
        return [(r.address, r.weight, r.forwarding) for r in self.kernel.services[key].real_servers]
