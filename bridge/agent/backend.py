"""The backend role's passes in the running agent: each one its own small pass over this node's VIPs, fou
port and sysctls (`backend_pass`), with nothing kept between passes but the node's desired state per service
(`NodeBook`) and the services whose claims could not be computed, which /health shows."""

from __future__ import annotations

import time

from bridge.agent.reconcile import Reconciled, RoleHealth, Stage, Watch, backend_pass, state_for_apply
from bridge.core.config import Config
from bridge.core.live import LiveState
from bridge.core.memory import Memory
from bridge.core.model import Snapshot
from bridge.core.node_book import NodeBook
from bridge.core.outcome import PassOutcome
from bridge.files.maintenance import maintenance_json
from bridge.files.store import Stored, save_state


class BackendReconciler:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._failures: dict[str, str] = {}
        self._book = NodeBook(config)

    def reconcile(self, snapshot: Snapshot, memory: Memory, *, full: bool, now: float,
                  stage: Stage) -> Reconciled:
        """Every pass reads and plans the whole node (`full` changes nothing: a node holds a few VIPs); its
        desired state is kept per service (`NodeBook`)."""
        stage.name = "backend pass"
        outcome = backend_pass(snapshot, self.config, dry_run=self.config.dataplane == "shadow", now=now,
                               book=self._book)
        self._failures = dict(outcome.failures)
        return Reconciled(outcome, memory, None)

    def once(self, snapshot: Snapshot, *, dry_run: bool) -> PassOutcome:
        """`apply --role backend`: the pass, then its report in the state file (the running agent's shell
        saves its own after every pass)."""
        stored = state_for_apply(self.config, dry_run=dry_run)
        now = time.time()
        outcome = backend_pass(snapshot, self.config, dry_run=dry_run, now=now)
        if not dry_run:
            save_state(self.config.state_file, Stored(stored.memory, outcome.report(now)))
        return outcome

    def failed(self) -> None:
        """Nothing is kept open between passes; the desired state is computed afresh."""
        self._book = NodeBook(self.config)

    def reconfigure(self, config: Config) -> None:
        self.config = config
        self._book = NodeBook(config)

    def close(self) -> None:
        """Nothing is kept open between passes."""

    def watches(self) -> list[Watch]:
        return []

    def health(self) -> RoleHealth:
        """A backend announces nothing: never in maintenance, even with the directors' bgp section (the Nomad
        job gives both roles one configuration)."""
        return RoleHealth(maintenance_json(None), None, 0, dict(self._failures))

    def shadow_state(self) -> LiveState | None:
        return None
