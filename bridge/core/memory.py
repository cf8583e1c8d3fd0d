"""What the kernel cannot tell the agent, kept across passes and restarts in the state file: each real
server's remembered weight and each drain's deadline, keyed by `dest_id`.

The kernel builds the Maglev table from a real server's last non-zero weight and never reports it; the
rule for how that weight moves is `remember`, the one place it is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from bridge.core.ops import AddDest, DelDest, DelService, Op, SetDest, VsKey, vs_label


def dest_id(key: VsKey, address: str, port: int) -> str:
    return f"{vs_label(key)}>{address}:{port}"


@dataclass(frozen=True)
class Memory:
    """What the kernel cannot tell the agent, kept across passes and restarts (state file)."""

    drain_deadlines: Mapping[str, float] = field(default_factory=dict)
    last_weights: Mapping[str, int] = field(default_factory=dict)


def remember(last_weights: Mapping[str, int], ops: Iterable[Op]) -> dict[str, int]:
    """The kernel's last_weight bookkeeping after `ops` succeeded (ip_vs_ctl.c: set on add, and on edits to a
    non-zero weight)."""
    updated = dict(last_weights)
    for op in ops:
        if isinstance(op, AddDest) or (isinstance(op, SetDest) and op.weight != 0):
            updated[dest_id(op.key, op.address, op.port)] = op.weight
        elif isinstance(op, DelDest):
            updated.pop(dest_id(op.key, op.address, op.port), None)
        elif isinstance(op, DelService):
            prefix = vs_label(op.key) + ">"
            updated = {k: v for k, v in updated.items() if not k.startswith(prefix)}
    return updated
