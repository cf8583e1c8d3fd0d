"""Desired allow lists + the agent's nftables table -> the smallest list of filter operations. Pure.

The filter follows the IPVS services: a service's allow list is applied before the service is added (the
filter operations come first in a plan), and it stays while a withdrawn service drains, so the sources it
refused never reach it; it goes with the service. A service whose list is None (everyone) has no entry at
all, and the table is created only once some service has a list. The table itself is never deleted: like
IPVS, the filter stays as it is when the agent stops (fail static).
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable

from bridge.core.keys import ServiceKey
from bridge.core.live import LiveAllow, LiveFilter
from bridge.core.model import VirtualService
from bridge.core.ops import AddAllow, ChangeAllow, CreateFilter, DelAllow, FilterOp, Op


def _remove(entry: LiveAllow) -> DelAllow:
    return DelAllow(entry.key, entry.rule, entry.prefixes is not None, entry.counter)


def plan_filter(desired: Iterable[VirtualService], live: LiveFilter, kept: Collection[ServiceKey],
                scope: Collection[ServiceKey] | None = None) -> list[Op]:
    """`desired`: the virtual services planned (already restricted to a scope); `kept`: keys of live IPVS
    services that stay after this pass (draining ones keep their entry as it is); `scope`: only entries of
    these keys are looked at, none is removed outside it."""
    entries = {e.key: e for e in live.allows if scope is None or e.key in scope}
    ops: list[Op] = []
    wanted = {vs.key: vs.allow for vs in desired if vs.allow is not None}
    for key, prefixes in wanted.items():
        entry = entries.pop(key, None)
        if entry is None or not entry.whole:
            if entry is not None:
                ops.append(_remove(entry))
            ops.append(AddAllow(key, prefixes))
        elif entry.prefixes != prefixes:
            ops.append(ChangeAllow(key, prefixes, entry.prefixes or ()))
    desired_keys = {vs.key for vs in desired}
    ops.extend(_remove(entry) for key, entry in sorted(entries.items())
               if key in desired_keys or key not in kept)
    if ops and not live.table and any(isinstance(op, AddAllow) for op in ops):
        ops.insert(0, CreateFilter())
    return ops


def applied(table: LiveFilter, op: FilterOp, rule: int | None) -> LiveFilter:
    """The table after `op` took effect, so a pass need not list the table again (listing 2,000 sets costs
    0.5-1.5 s). `rule`: the handle the kernel gave a rule `op` added (any number serves a model). Entries
    stay in the listing's order (VIP, port, protocol). Drop counts are not tracked: what reads them
    (status, metrics) lists the table."""
    if isinstance(op, CreateFilter):
        return LiveFilter(True, table.allows)
    allows = list(table.allows)
    index = next((i for i, e in enumerate(allows) if e.key == op.key), None)
    old = None if index is None else allows.pop(index)
    if isinstance(op, DelAllow):
        return LiveFilter(table.table, tuple(allows))
    if isinstance(op, ChangeAllow) and old is not None:
        entry = LiveAllow(op.key, op.prefixes, old.rule, old.counter, old.drops)
    else:
        entry = LiveAllow(op.key, op.prefixes, rule, True)
    if index is None:
        index = bisect.bisect(allows, op.key.listing_order(), key=lambda e: e.key.listing_order())
    allows.insert(index, entry)
    return LiveFilter(table.table, tuple(allows))
