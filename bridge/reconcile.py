"""One reconcile pass for either role: read live state, plan against the desired state, apply, remember.

The same function serves `apply` (once), `run` (on every change and periodically) and shadow mode
(plan and report, touch nothing), so what an operator tries by hand is what the agent does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bridge.config import Config
from bridge.dataplane.backend import BackendKernel, plan_backend
from bridge.dataplane.diff import Memory, plan, remember
from bridge.dataplane.kernel import ApplyError, Kernel
from bridge.desired import claims_of_node, compute_desired
from bridge.model import DesiredState, Rejection, Snapshot
from bridge.store import Stored, load_state, save_state


@dataclass(frozen=True)
class StepResult:
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

    @property
    def failed(self) -> tuple[StepResult, ...]:
        return tuple(s for s in self.steps if s.error)

    def report(self, now: float) -> dict[str, Any]:
        return {
            "role": self.role,
            "at": now,
            "applied": self.applied,
            "operations": [asdict(s) for s in self.steps],
            "rejected": [asdict(r) for r in self.rejected],
            "draining": list(self.draining),
            "notes": list(self.notes),
        }


def local_address(config: Config, kernel: Kernel) -> str:
    return config.local_address or kernel.default_local_address()


def desired_for(snapshot: Snapshot, config: Config, kernel: Kernel) -> DesiredState:
    return compute_desired(snapshot, config, local_address(config, kernel))


def director_pass(snapshot: Snapshot, config: Config, kernel: Kernel, *, dry_run: bool, now: float | None = None,
                  ) -> PassOutcome:
    now = time.time() if now is None else now
    desired = desired_for(snapshot, config, kernel)
    stored = load_state(config.state_file)
    notes: tuple[str, ...] = ()
    try:
        live = kernel.read()
    except ApplyError as exc:
        if not dry_run:
            raise
        live = kernel.read(services=False)
        notes = (f"planned against an empty IPVS table: {exc}",)
    result = plan(desired, live, stored.memory, now, config.drain_timeout)
    if dry_run:
        steps = tuple(StepResult(op.describe(), None) for op in result.ops)
        return PassOutcome("director", False, steps, desired.rejected, result.draining, desired, notes)
    last_weights = dict(stored.memory.last_weights)
    steps_list = []
    for outcome in kernel.apply(result.ops):
        steps_list.append(StepResult(outcome.op.describe(), outcome.error))
        if outcome.error is None:
            last_weights = remember(last_weights, outcome.op)
    done = PassOutcome("director", True, tuple(steps_list), desired.rejected, result.draining, desired)
    save_state(config.state_file, Stored(Memory(result.drain_deadlines, last_weights), done.report(now)))
    return done


def backend_pass(snapshot: Snapshot, config: Config, *, dry_run: bool, now: float | None = None) -> PassOutcome:
    now = time.time() if now is None else now
    claims = claims_of_node(snapshot, config, config.node_name)
    rejected = tuple(
        r for r in compute_desired(snapshot, config, "0.0.0.0").rejected
        if any(i.instance_id == r.instance and i.node == config.node_name for i in snapshot.instances)
    )
    backend = BackendKernel(config)
    try:
        ops = plan_backend((c.vip for c in claims), backend.read(), config.fou_port)
        steps: Sequence[StepResult]
        if dry_run:
            steps = [StepResult(op.describe(), None) for op in ops]
        else:
            steps = [
                StepResult(op.describe(), error if op.kind != "conflict" else op.target)
                for op, error in backend.apply(op for op in ops if op.kind != "conflict")
            ] + [StepResult(op.describe(), op.target) for op in ops if op.kind == "conflict"]
    finally:
        backend.close()
    done = PassOutcome("backend", not dry_run, tuple(steps), rejected)
    if not dry_run:
        save_state(config.state_file, Stored(load_state(config.state_file).memory, done.report(now)))
    return done
