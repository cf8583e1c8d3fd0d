"""What the kernel cannot tell the agent, kept across passes and restarts in the state file: each real
server's remembered weight and each drain's deadline.

The kernel builds the Maglev table from a real server's last non-zero weight and never reports it. The rule
for that weight is written here and nowhere else: how operations move it (`remember`, `remember_op`) and
what it is for a real server the kernel lists (`last_weight`). The planner, `status`, `explain`, /metrics
and the tests' fake kernel all call these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field

from bridge.core.keys import DestKey, ServiceKey
from bridge.core.live import LiveRealServer
from bridge.core.ops import AddDest, DelDest, DelService, Op, SetDest

Draining = ServiceKey | DestKey
"""What drains: a whole virtual service that left the catalog, or one real server of a kept one."""


def parse_draining(text: str) -> Draining:
    """A drain deadline's key as the state file writes it; ValueError saying what was expected."""
    return DestKey.parse(text) if ">" in text else ServiceKey.parse(text)


def service_of(key: Draining) -> ServiceKey:
    return key if isinstance(key, ServiceKey) else key.service


@dataclass(frozen=True)
class Memory:
    """What the kernel cannot tell the agent, kept across passes and restarts (state file)."""

    drain_deadlines: Mapping[Draining, float] = field(default_factory=dict)
    last_weights: Mapping[DestKey, int] = field(default_factory=dict)


def remember_op(last_weights: MutableMapping[DestKey, int], op: Op) -> bool:
    """The kernel's last_weight bookkeeping after `op` succeeded (ip_vs_ctl.c: set on add, and on edits to a
    non-zero weight; gone with the real server or its service). True when it changed `last_weights`."""
    if isinstance(op, AddDest) or (isinstance(op, SetDest) and op.weight != 0):
        key = DestKey(op.key, op.address, op.port)
        if last_weights.get(key) == op.weight:
            return False
        last_weights[key] = op.weight
        return True
    if isinstance(op, DelDest):
        return last_weights.pop(DestKey(op.key, op.address, op.port), None) is not None
    if isinstance(op, DelService):
        gone = [k for k in last_weights if k.service == op.key]
        for key in gone:
            del last_weights[key]
        return bool(gone)
    return False


def remember(last_weights: Mapping[DestKey, int], ops: Iterable[Op]) -> Mapping[DestKey, int]:
    """`last_weights` after `ops` succeeded: a new mapping, or `last_weights` itself when no operation moved
    a remembered weight (most passes: a real server set to 0 and back keeps its weight), which lets the state
    file skip re-writing the keys' text (bridge/files/store.py)."""
    updated = dict(last_weights)
    changed = False
    for op in ops:
        changed = remember_op(updated, op) or changed
    return updated if changed else last_weights


def last_weight(service: ServiceKey, live: LiveRealServer, last_weights: Mapping[DestKey, int]) -> int | None:
    """The weight the kernel builds its table from for a real server it lists: its weight when that is
    non-zero (a non-zero weight is always the remembered one), else what this agent remembers; None when it
    remembers nothing (state file lost), which no caller may take for a known value."""
    if live.weight > 0:
        return live.weight
    return last_weights.get(DestKey(service, live.address, live.port))
