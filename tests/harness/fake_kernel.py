"""The shadow data plane with the kernel's last_weight bookkeeping added, for fast unit tests of the planner.

ShadowKernel models the list semantics the planner relies on (a new real server goes to the head of the
list); this adds what the kernel remembers and never reports, by the rule the agent keeps
(bridge.core.memory.remember_op: last_weight is set on add and on edits to a non-zero weight). The real
kernel tests confirm both (tests/kernel/test_maglev_exact.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from bridge.core.keys import DestKey
from bridge.core.memory import remember_op
from bridge.core.ops import Op
from bridge.dataplane.shadow import ShadowKernel


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
            remember_op(self.last_weight, result.op)

    def table_state(self) -> list[tuple[str, tuple[tuple[str, int, int], ...]]]:
        """What ip_vs_mh builds its table from: list order and each real server's last_weight."""
        return [
            (f"{k}", tuple((r.address, r.weight, self.last_weight[DestKey(k, r.address, r.port)])
                           for r in s.real_servers))
            for k, s in sorted(self.services.items())
        ]
