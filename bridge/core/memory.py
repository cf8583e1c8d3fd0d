"""What the kernel cannot tell the agent, kept across passes and restarts in the state file: the remembered
weight of each real server at weight 0 and each drain's deadline.

The kernel builds the Maglev table from a real server's last non-zero weight and never reports it; for a real
server at a non-zero weight it is that weight. The rule for it is written here and nowhere else: how
operations move it (`remember`) and what it is for a real server the kernel lists (`last_weight`). The
planner, `status`, `explain` and /metrics call these; the tests' fake kernel follows the kernel's rule on
its own, as a check of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from bridge.core.keys import DestKey, ServiceKey
from bridge.core.live import LiveRealServer, LiveService
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
    """Of real servers at weight 0 only (`remember`); an older state file's other entries are harmless."""


def remember(last_weights: Mapping[DestKey, int], live: Iterable[LiveService],
             ops: Iterable[Op]) -> Mapping[DestKey, int]:
    """The remembered weights after `ops` succeeded on the kernel the pass read (`live`), by the kernel's rule
    (ip_vs_ctl.c: an add sets a real server's last weight, even to 0; an edit sets it only to a non-zero weight;
    it goes with the real server or its service). Only real servers left at weight 0 keep one: any other's is
    its weight, which the kernel reports (`last_weight`), so at 2,000 services x 5 the state file holds the few
    drained or critical ones instead of 10,000. Hence an edit to 0 remembers the weight the real server had
    before it, which the pass read or an earlier operation of it set. A state file from before, with every
    real server's weight, reads the same: what the pass finds at a non-zero weight, or finds gone from a
    service it read, is dropped. What belongs to services the pass did not read is kept as it was.

    A new mapping, or `last_weights` itself when nothing changed (most passes), which lets the state file
    skip re-writing the keys' text (bridge/files/store.py)."""
    weights = _Weights(live)
    updated = dict(last_weights)
    for op in ops:
        if isinstance(op, AddDest | SetDest):
            key = DestKey(op.key, op.address, op.port)
            before = weights.set(key, op.weight)
            if op.weight:
                updated.pop(key, None)
            elif isinstance(op, AddDest):
                updated[key] = 0
            elif before:
                updated[key] = before
        elif isinstance(op, DelDest):
            key = DestKey(op.key, op.address, op.port)
            weights.set(key, None)
            updated.pop(key, None)
        elif isinstance(op, DelService):
            weights.forget(op.key)
            for key in [k for k in updated if k.service == op.key]:
                del updated[key]
    for key in [k for k in updated if weights.reported(k)]:
        del updated[key]
    return last_weights if updated == last_weights else updated


class _Weights:
    """Each real server's weight as a pass's operations leave it, from what the pass read. A virtual service's
    real servers are indexed only once an operation changes one of them; a remembered weight of any other is
    checked against the list the pass read (a few entries), so that a full pass with nothing to change does not
    index every real server it read."""

    def __init__(self, live: Iterable[LiveService]) -> None:
        self._read = {service.key: service for service in live}
        self._changed: dict[ServiceKey, dict[tuple[str, int], int]] = {}

    def set(self, key: DestKey, weight: int | None) -> int | None:
        """Give `key` its new weight (None: deleted); the weight it had before (None: not listed)."""
        now = self._changed.get(key.service)
        if now is None:
            read = self._read.get(key.service)
            now = self._changed[key.service] = {(rs.address, rs.port): rs.weight
                                                 for rs in (read.real_servers if read else ())}
        before = now.get((key.address, key.port))
        if weight is None:
            now.pop((key.address, key.port), None)
        else:
            now[(key.address, key.port)] = weight
        return before

    def forget(self, service: ServiceKey) -> None:
        self._changed[service] = {}

    def reported(self, key: DestKey) -> bool:
        """True when the kernel reports all there is to know about `key`: the pass left it at a non-zero weight,
        or it looked at its service and the real server is not there."""
        now = self._changed.get(key.service)
        if now is not None:
            return now.get((key.address, key.port)) != 0
        read = self._read.get(key.service)
        if read is None:
            return False
        for rs in read.real_servers:
            if rs.address == key.address and rs.port == key.port:
                return rs.weight != 0
        return True


def last_weight(service: ServiceKey, live: LiveRealServer, last_weights: Mapping[DestKey, int]) -> int | None:
    """The weight the kernel builds its table from for a real server it lists: its weight when that is
    non-zero (a non-zero weight is always the remembered one), else what this agent remembers; None when it
    remembers nothing (state file lost), which no caller may take for a known value."""
    if live.weight > 0:
        return live.weight
    return last_weights.get(DestKey(service, live.address, live.port))
