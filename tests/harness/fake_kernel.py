"""The shadow data plane with the kernel's last_weight bookkeeping added, for fast unit tests of the planner.

ShadowKernel models the list semantics the planner relies on (a new real server goes to the head of the
list); this adds what the kernel remembers for every real server and never reports, by the kernel's rule
(ip_vs_ctl.c: last_weight is set on add, and on edits to a non-zero weight), written here apart from the
agent's own bookkeeping (bridge.core.memory.remember, which keeps only what the kernel cannot report) so
that tests can check one against the other. The real kernel tests confirm the rule
(tests/kernel/test_maglev_exact.py).
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping

from bridge.core.keys import DestKey
from bridge.core.ops import AddDest, DelDest, DelService, Op, SetDest
from bridge.dataplane.shadow import ShadowKernel


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
