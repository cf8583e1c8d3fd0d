"""One reconcile pass for either role: read live state, plan against the desired state, apply, remember.

The same function serves `apply` (once), `run` (on every change, scoped to what changed, and
periodically in full) and shadow mode (against a model of the kernel, touching nothing), so what an
operator tries by hand is what the agent does.

`Reconciler` is what the agent's shell calls, whatever the role: the CLI picks one per process
(bridge/agent/director.py, bridge/agent/backend.py), so no role branches run in the shell.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from bridge.core.announce import Announcing, announcing
from bridge.core.config import Config
from bridge.core.desired import compute_desired
from bridge.core.gcpause import gc_paused
from bridge.core.live import LiveState
from bridge.core.memory import Memory, remember
from bridge.core.model import DesiredState, Snapshot
from bridge.core.node_book import NodeBook
from bridge.core.ops import AddAllow, AddDest, AddService, Announce, FilterOp, Op, OpResult, Scope
from bridge.core.outcome import PassOutcome, StepResult
from bridge.core.plan import plan
from bridge.core.printable import printable
from bridge.dataplane.backend import BackendKernel, plan_backend, receivers
from bridge.dataplane.errors import ApplyError
from bridge.dataplane.kernel import open_kernel
from bridge.dataplane.shadow import ShadowKernel
from bridge.dataplane.view import Dataplane, KernelView
from bridge.files.maintenance import read_maintenance
from bridge.files.store import Stored, load_state, recover_state, save_state

SKIPPED = "skipped: an earlier operation of this pass failed"
UNFILTERED = "not added: its allow list could not be put in place (filter operation failed)"


@dataclass
class Stage:
    """Which stage a pass is in, so a failure says where it happened."""

    name: str


@dataclass(frozen=True)
class Reconciled:
    """What one of the agent's passes did, and the memory to keep. `scope`: how many virtual services a
    scoped pass covered; None when it covered everything the role owns."""

    outcome: PassOutcome
    memory: Memory
    scope: int | None


@dataclass(frozen=True)
class Watch:
    """Something beside the catalog that a role's passes read, checked every `seconds` by the shell's timer:
    `changed` returns the reason for a (full) pass when it changed, else None."""

    name: str
    seconds: float
    changed: Callable[[], str | None]


@dataclass(frozen=True)
class RoleHealth:
    """The role's part of /health: maintenance and announcements (a director with a `bgp` section), the
    virtual services changed but not yet applied, and the services whose desired state or claims could not
    be computed."""

    maintenance: dict[str, Any]
    announcing: dict[str, Any] | None
    pending: int
    failures: dict[str, str]


class Reconciler(Protocol):
    """One role's passes, as the agent's shell drives them. `config` is what every pass reads; a SIGHUP
    changes it through `reconfigure`."""

    config: Config

    def reconcile(self, snapshot: Snapshot, memory: Memory, *, full: bool, now: float,
                  stage: Stage) -> Reconciled:
        """One pass of the running agent; `stage` is kept current so a failure says where it happened."""
        ...

    def once(self, snapshot: Snapshot, *, dry_run: bool) -> PassOutcome:
        """`maglev-bridge apply`: one full pass with a desired state computed afresh, and the state file."""
        ...

    def failed(self) -> None:
        """A pass raised: drop what may no longer match the kernel (the next pass is a full one)."""
        ...

    def reconfigure(self, config: Config) -> None:
        """SIGHUP's new configuration (only its live keys differ)."""
        ...

    def close(self) -> None:
        """Release the kernel; the next pass opens it again."""
        ...

    def watches(self) -> list[Watch]:
        """What to check between passes, from now on (called once, at start)."""
        ...

    def health(self) -> RoleHealth: ...

    def shadow_state(self) -> LiveState | None:
        """Shadow mode's model of what /metrics reads from the kernel; else None."""
        ...


def director_pass(desired: DesiredState, config: Config, dataplane: Dataplane, memory: Memory, *, apply: bool,
                  now: float, scope: Scope = None, announce: Announcing | None = None) -> tuple[PassOutcome, Memory]:
    """Read, plan, and (with `apply`) carry out; the outcome and the memory to keep. The caller owns the state
    file, so the agent can keep its memory in RAM between passes and write it once per pass. Announcements
    (the plan's last operations) are skipped when anything before them failed: a director whose tables are
    not right must not attract traffic."""
    live = dataplane.read(scope)
    result = plan(desired, live, memory, now, config.drain_timeout, scope, announce)
    if not apply:
        steps = tuple(StepResult(op.describe(), None) for op in result.ops)
        return PassOutcome("director", False, steps, desired.rejected, result.draining, desired), memory
    announces = [op for op in result.ops if isinstance(op, Announce)]
    results = _apply_filtered_first(dataplane, [op for op in result.ops if not isinstance(op, Announce)])
    if any(r.error for r in results):
        results += [OpResult(op, SKIPPED) for op in announces]
    else:
        results += dataplane.apply(announces)
    done = PassOutcome("director", True, tuple(StepResult(r.op.describe(), r.error) for r in results),
                       desired.rejected, result.draining, desired)
    succeeded = [r.op for r in results if r.error is None]
    return done, Memory(result.drain_deadlines, remember(memory.last_weights, live.services, succeeded))


def _apply_filtered_first(dataplane: Dataplane, ops: list[Op]) -> list[OpResult]:
    """The plan up to its filter operations first (they are contiguous: one nftables transaction), then the
    rest, without the new services whose allow list could not be put in place: such a service added anyway
    would serve every source on a VIP that is already announced (another port, another director). They are
    reported as not done, so the pass failed, its announcements wait, and the next pass tries again."""
    cut = max((i + 1 for i, op in enumerate(ops) if isinstance(op, FilterOp)), default=0)
    results = list(dataplane.apply(ops[:cut]))
    unfiltered = {r.op.key for r in results if r.error and isinstance(r.op, AddAllow)}
    new = {op.key for op in ops[cut:] if isinstance(op, AddService) and op.key in unfiltered}
    held = [op for op in ops[cut:] if isinstance(op, AddService | AddDest) and op.key in new]
    results += dataplane.apply(op for op in ops[cut:] if not (isinstance(op, AddService | AddDest) and op.key in new))
    return results + [OpResult(op, UNFILTERED) for op in held]


def announce_decision(desired: DesiredState, config: Config, *, full_pass: bool,
                      gate_open: bool) -> Announcing | None:
    """What this pass announces: None without a `bgp` section (the announce table is then never touched);
    nothing in maintenance (the maintenance file is read on every pass, so it survives restarts)."""
    if config.bgp is None:
        return None
    return announcing(desired, config.bgp.table, maintenance=read_maintenance(config.bgp.maintenance_file) is not None,
                      full_pass=full_pass, gate_open=gate_open)


def state_for_apply(config: Config, *, dry_run: bool) -> Stored:
    """What `apply` starts from, read once: a dry run only reads the state file; a real one, which will write
    it, moves a bad file aside first and says what was lost."""
    if dry_run:
        return load_state(config.state_file)
    stored, warning = recover_state(config.state_file)
    if warning:
        logging.getLogger("maglev-bridge").warning("%s", warning)
    return stored


def apply_once(snapshot: Snapshot, config: Config, *, dry_run: bool) -> PassOutcome:
    """`maglev-bridge apply`: one full pass against the kernel, with the state file the agent uses. A dry run
    on a kernel without IPVS plans against an empty IPVS table and says so. The cyclic garbage collector is
    paused for the pass (bridge/core/gcpause.py): its collections over the catalog's and the plan's objects
    cost 0.3 s of a full apply of 500 VIPs x 20 backends in the test VM and found nothing to free."""
    with gc_paused():
        return _apply_once(snapshot, config, dry_run=dry_run)


def _apply_once(snapshot: Snapshot, config: Config, *, dry_run: bool) -> PassOutcome:
    now = time.time()
    stored = state_for_apply(config, dry_run=dry_run)
    with open_kernel(config) as kernel:
        desired = compute_desired(snapshot, config, config.local_address or kernel.default_local_address())
        announce = announce_decision(desired, config, full_pass=True, gate_open=False)
        try:
            outcome, memory = director_pass(desired, config, KernelView(kernel, keep=False), stored.memory,
                                            apply=not dry_run, now=now, announce=announce)
        except ApplyError as exc:
            if not dry_run:
                raise
            shadow = ShadowKernel(kernel.read(services=False))
            outcome, _ = director_pass(desired, config, shadow, stored.memory, apply=False, now=now,
                                       announce=announce)
            return replace(outcome, notes=(f"planned against an empty IPVS table: {exc}",))
    if not dry_run:
        save_state(config.state_file, Stored(memory, outcome.report(now)))
    return outcome


def backend_pass(snapshot: Snapshot, config: Config, *, dry_run: bool, now: float | None = None,
                 book: NodeBook | None = None) -> PassOutcome:
    """With the running agent's `book`, the desired state follows the node's changes; without, it is computed
    afresh (`apply`)."""
    now = time.time() if now is None else now
    desired = (book or NodeBook(config)).update(snapshot)
    failures, rejected = desired.failures, desired.rejected
    backend = BackendKernel(config)
    try:
        live = backend.read()
        vips = set(desired.vips) | (set(live.vips) if failures else set())
        ops = plan_backend(vips, live, receivers(config), desired.underlays)
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
    notes = tuple(f"service {printable(name)}: claims could not be computed ({why}); this node keeps its VIPs"
                  for name, why in sorted(failures.items()))
    done = PassOutcome("backend", not dry_run, tuple(steps), rejected, notes=notes,
                       failures=tuple(sorted(failures.items())))
    return done
