"""The director's passes in the running agent: the desired state kept per service (DesiredBook), the kernel
kept open between passes (or shadow mode's model of it, seeded from it once), and the BGP gate.

A catalog change costs what it changes: the pass reads and plans only the virtual services whose desired
value changed since the last applied pass; full passes (start, re-sync, drain deadlines, retries) read and
plan everything.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from bridge.agent.reconcile import Reconciled, RoleHealth, Stage, Watch, announce_decision, apply_once, director_pass
from bridge.catalog.source import FileStamp, file_stamp
from bridge.core.announce import Announcing
from bridge.core.config import BgpConfig, Config
from bridge.core.desired import DesiredBook
from bridge.core.encap import ipv6_underlay
from bridge.core.keys import ServiceKey
from bridge.core.live import LiveState
from bridge.core.memory import Memory
from bridge.core.model import DesiredState, Snapshot
from bridge.core.outcome import PassOutcome
from bridge.dataplane.errors import ApplyError
from bridge.dataplane.kernel import Kernel
from bridge.dataplane.shadow import ShadowKernel
from bridge.dataplane.view import Dataplane, KernelView
from bridge.files.maintenance import maintenance_json, read_maintenance

log = logging.getLogger("maglev-bridge")


class BgpGate:
    """A director's announcements: none until a full pass has been applied without failures (a director
    whose tables are not right must not attract traffic), none in maintenance, and a watch on the
    maintenance file so `maintenance on|off` takes effect at once."""

    def __init__(self) -> None:
        self.open = False
        """A full pass has been applied without failures: from now on any pass may add announcements."""
        self._seen: FileStamp | None = None

    def decide(self, desired: DesiredState, config: Config, *, full: bool) -> Announcing | None:
        return announce_decision(desired, config, full_pass=full, gate_open=self.open)

    def passed(self, *, full: bool, failed: bool) -> None:
        if full and not failed:
            self.open = True

    def watch(self, bgp: BgpConfig) -> None:
        """From now on, a change of the maintenance file is a reason for a pass (the start pass reads it)."""
        self._seen = file_stamp(bgp.maintenance_file)

    def maintenance_changed(self, bgp: BgpConfig) -> str | None:
        """Once a second (a stat): `maintenance on|off` asks for a pass at once; the pass reads the file. A
        full one: `maintenance on` has already deleted the announcements itself, so the cached view of the
        announce table is stale (a small pass before this one withdraws what is gone, which is not an error:
        kernel.GONE)."""
        seen = file_stamp(bgp.maintenance_file)
        if seen == self._seen:
            return None
        self._seen = seen
        return f"maintenance {'on' if seen else 'off'}"

    def health(self, bgp: BgpConfig | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """/health's maintenance and announcing."""
        if bgp is None:
            return maintenance_json(None), None
        gate = "open" if self.open else "closed: waiting for a full pass applied without failures"
        return maintenance_json(read_maintenance(bgp.maintenance_file)), {"table": bgp.table, "gate": gate}


class DirectorReconciler:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.book = DesiredBook(config)
        self.pending: set[ServiceKey] = set()
        """Virtual services whose desired value changed since the last applied pass: a scoped pass's scope."""
        self.gate = BgpGate()
        self.dataplane: Dataplane | None = None
        self._kernel: Kernel | None = None
        self._local_address = "0.0.0.0"
        self.mtu_warning: str | None = None
        """The underlay's MTU problem (bridge/core/encap.py), logged once when it appears."""

    def reconcile(self, snapshot: Snapshot, memory: Memory, *, full: bool, now: float,
                  stage: Stage) -> Reconciled:
        stage.name = "desired state"
        self.pending |= self.book.update(snapshot)
        stage.name = "kernel read"
        dataplane = self._open(refresh=full)
        stage.name = "desired state"
        scope = None if full else frozenset(self.pending)
        desired = self.book.desired(self._local_address)
        if full and self._kernel is not None:
            stage.name = "kernel read"
            self._check_mtu(self._kernel, desired)
            stage.name = "desired state"
        if scope is None and self.book.unknown:
            # a service never computed may own kernel state: plan only what is known, delete nothing else
            scope = frozenset(vs.key for vs in desired.virtual_services)
        size = None if full else len(scope or ())
        announce = self.gate.decide(desired, self.config, full=full)
        if not full and not scope and announce is None:
            return Reconciled(PassOutcome("director", False, (), desired.rejected, (), desired), memory, size)
        stage.name = "plan and apply"
        outcome, memory = director_pass(desired, self.config, dataplane, memory, apply=True, now=now, scope=scope,
                                        announce=announce)
        self.pending.clear()
        self.gate.passed(full=full, failed=bool(outcome.failed))
        if self.config.dataplane == "shadow":
            outcome = replace(outcome, applied=False)
        return Reconciled(outcome, memory, size)

    def once(self, snapshot: Snapshot, *, dry_run: bool) -> PassOutcome:
        return apply_once(snapshot, self.config, dry_run=dry_run)

    def _open(self, refresh: bool) -> Dataplane:
        """The kernel, kept open between passes; in shadow mode a model seeded from it once."""
        if self.dataplane is not None and not refresh:
            return self.dataplane
        if self._kernel is None:
            self._kernel = Kernel(self.config)
        if self.dataplane is None:
            if self.config.dataplane == "shadow":
                self.dataplane = self._shadow(self._kernel)
            else:
                self.dataplane = KernelView(self._kernel)
        self._local_address = self._tunnel_source(self._kernel)
        return self.dataplane

    def _check_mtu(self, kernel: Kernel, desired: DesiredState) -> None:
        """On every full pass: an MTU raised or lowered by hand is noticed within a resync_interval. With IPv6
        real servers (`gue` mode's IPv6 backends) also the IPv6 underlay's, towards one of them."""
        warning = kernel.mtu_warning(self._local_address, ipv6_underlay(
            rs.address for vs in desired.virtual_services for rs in vs.real_servers))
        if warning and warning != self.mtu_warning:
            log.warning("%s", warning)
        elif self.mtu_warning and not warning:
            log.info("underlay MTU is now large enough for %s encapsulation", self.config.encapsulation)
        self.mtu_warning = warning

    def _tunnel_source(self, kernel: Kernel) -> str:
        """Configured, else the default route's address; shadow mode on a host without a default route
        plans with 0.0.0.0 rather than not at all."""
        if self.config.local_address:
            return self.config.local_address
        try:
            return kernel.default_local_address()
        except ApplyError:
            if self.config.dataplane != "shadow":
                raise
            return "0.0.0.0"

    def _shadow(self, kernel: Kernel) -> ShadowKernel:
        try:
            seed = kernel.read()
        except ApplyError as exc:
            log.info("shadow mode: starting from an empty IPVS table: %s", exc)
            seed = kernel.read(services=False)
        return ShadowKernel(seed)

    def failed(self) -> None:
        """Re-read the kernel before the next pass (it may have applied part of its operations); shadow mode's
        model is what shadow mode did, so it is kept."""
        if self.config.dataplane != "shadow":
            self.close()

    def reconfigure(self, config: Config) -> None:
        """A fresh desired state under the new configuration; a changed vip_cidrs changes what the agent owns
        in the kernel, so the kernel is read again."""
        old, self.config = self.config, config
        self.book = DesiredBook(config)
        self.pending.clear()
        if old.vip_cidrs != config.vip_cidrs:
            self.close()

    def close(self) -> None:
        if self._kernel is not None:
            self._kernel.close()
        self._kernel = None
        self.dataplane = None

    def maintenance_changed(self) -> str | None:
        assert self.config.bgp is not None
        return self.gate.maintenance_changed(self.config.bgp)

    def watches(self) -> list[Watch]:
        if self.config.bgp is None:
            return []
        self.gate.watch(self.config.bgp)
        return [Watch("maintenance", 1.0, self.maintenance_changed)]

    def health(self) -> RoleHealth:
        maintenance, announcing = self.gate.health(self.config.bgp)
        return RoleHealth(maintenance, announcing, len(self.pending), dict(self.book.failures))

    def shadow_state(self) -> LiveState | None:
        """The model's IPVS table, announced VIPs and filter in shadow mode; else None."""
        dataplane = self.dataplane
        if not isinstance(dataplane, ShadowKernel):
            return None
        return LiveState(tuple(dataplane.services.values()), announced=tuple(dataplane.announced),
                         filter=dataplane.filter)
