"""The shadow data plane with the kernel's last_weight bookkeeping added, for fast unit tests of the planner.

ShadowKernel models the list semantics the planner relies on (a new real server goes to the head of the
list); this adds what the kernel remembers and never reports: last_weight is set on add and on edits to a
non-zero weight. The real kernel tests confirm both.
"""

from __future__ import annotations

from collections.abc import Iterable

from bridge.core.memory import dest_id
from bridge.core.ops import AddDest, DelDest, Op, SetDest
from bridge.dataplane.shadow import ShadowKernel


class FakeKernel(ShadowKernel):
    def __init__(self) -> None:
        super().__init__()
        self.last_weight: dict[str, int] = {}
        self.ops_run = 0

    def run(self, ops: Iterable[Op]) -> None:
        """Apply `ops`, failing the test on any operation the kernel would refuse."""
        for result in self.apply(ops):
            assert result.error is None, f"{result.op.describe()}: {result.error}"
            self.ops_run += 1
            op = result.op
            if isinstance(op, AddDest | SetDest | DelDest):
                ident = dest_id(op.key, op.address, op.port)
                if isinstance(op, DelDest):
                    self.last_weight.pop(ident, None)
                elif isinstance(op, AddDest) or op.weight:
                    self.last_weight[ident] = op.weight

    def table_state(self) -> list[tuple[str, tuple[tuple[str, int, int], ...]]]:
        """What ip_vs_mh builds its table from: list order and each real server's last_weight."""
        return [
            (f"{k}", tuple((r.address, r.weight, self.last_weight[dest_id(k, r.address, r.port)])
                           for r in s.real_servers))
            for k, s in sorted(self.services.items())
        ]
