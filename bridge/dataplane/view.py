"""The data plane as the long-running agent holds it between passes.

A pass after one catalog change should cost what the change costs, not what the whole director holds:
`KernelView` reads only the IPVS services in the pass's scope (the kernel stays the truth for them) and
keeps links and routes from the last full read, re-reading them after any pass that changed them. Full
passes (start, periodic resync, drain deadlines, after a failure) read everything.

`ShadowKernel` (`bridge.dataplane.shadow`) is the other `Dataplane`: the model of shadow mode.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Protocol

from bridge.core.filter import applied
from bridge.core.live import LiveFilter, LiveState
from bridge.core.ops import (
    CreateFilter,
    FilterOp,
    Op,
    OpResult,
    Scope,
    changes_network,
)
from bridge.dataplane.kernel import Kernel


class Dataplane(Protocol):
    def read(self, scope: Scope) -> LiveState:
        """Owned state: every IPVS service, or those of `scope`; always every link and route."""

    def apply(self, ops: Iterable[Op]) -> Iterator[OpResult]: ...


class KernelView:
    """The real kernel, with everything but the IPVS services (links, routes, announcements, sysctls, sync
    daemons) cached between passes."""

    def __init__(self, kernel: Kernel, *, keep: bool = True) -> None:
        """`keep=False` for a single pass (`apply`): nothing is kept, so nothing is read again after the pass
        (a full apply of 500 VIPs read its 250 VIP routes back for nothing, 0.5 s in the test VM)."""
        self.kernel = kernel
        self.keep = keep
        self._rest: LiveState | None = None

    def read(self, scope: Scope) -> LiveState:
        if scope is None or self._rest is None:
            state = self.kernel.read()
            if self.keep:
                self._rest = replace(state, services=())
            return state
        return replace(self._rest, services=self.kernel.read_services(scope))

    def apply(self, ops: Iterable[Op]) -> Iterator[OpResult]:
        """The cached part is read again after a pass changed any of it, except the nftables table: after a
        transaction that took effect the cached table moves by its operations, with the rule handles the
        kernel returned (listing it would cost a changed allow list 0.5-1.5 s at 2,000 sets); after a failed
        one it is listed."""
        network_changed = False
        filter_results: list[OpResult] = []
        for result in self.kernel.apply(ops):
            network_changed = network_changed or changes_network(result.op)
            if isinstance(result.op, FilterOp):
                filter_results.append(result)
            yield result
        if network_changed and self._rest is not None:
            daemons = self._rest.sync_daemons
            if self.kernel.config.conn_sync is not None:
                daemons = tuple(self.kernel.ipvs.daemons())
            rest = self.kernel.read(services=False, filter_table=False)
            self._rest = replace(rest, sync_daemons=daemons, filter=self._filter_after(filter_results))

    def _filter_after(self, results: list[OpResult]) -> LiveFilter:
        assert self._rest is not None
        table = self._rest.filter
        if all(r.error is None for r in results):
            for result in results:
                assert isinstance(result.op, FilterOp)
                key = None if isinstance(result.op, CreateFilter) else result.op.key
                table = applied(table, result.op, None if key is None else self.kernel.rule_handles.get(key))
            return table
        return self.kernel.read_filter()
