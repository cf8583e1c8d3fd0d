"""What one reconcile pass did, as plain data: the steps it took (each with the kernel's reason when it
failed), the claims it rejected, what is draining. `apply`, `run` and shadow mode all produce one, and the
operator tools print it (`bridge.inspect.text`) without importing the reconciler.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from bridge.core.model import DesiredState, Rejection


class StepResult(NamedTuple):
    """One step of a pass as it is printed and kept (a NamedTuple, for the same reason as OpResult)."""

    description: str
    error: str | None


@dataclass(frozen=True)
class PassOutcome:
    role: str
    applied: bool
    steps: tuple[StepResult, ...]
    rejected: tuple[Rejection, ...] = ()
    draining: tuple[str, ...] = ()
    desired: DesiredState | None = field(default=None, compare=False)
    notes: tuple[str, ...] = ()
    failures: tuple[tuple[str, str], ...] = ()
    """(service, why) for services whose desired state could not be computed; their state was kept."""

    @property
    def failed(self) -> tuple[StepResult, ...]:
        return tuple(s for s in self.steps if s.error)

    def report(self, now: float) -> dict[str, Any]:
        """What the state file keeps of the pass (`status` shows it). The steps are written out by hand: `asdict`,
        which copies recursively, cost 0.36 s of a 10,500-operation apply in the test VM."""
        return {
            "role": self.role,
            "at": now,
            "applied": self.applied,
            "operations": [{"description": s.description, "error": s.error} for s in self.steps],
            "rejected": [asdict(r) for r in self.rejected],
            "draining": list(self.draining),
            "notes": list(self.notes),
        }

