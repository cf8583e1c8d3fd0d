"""The long-running agent: one reconcile worker fed by catalog changes, drain deadlines and a periodic
full re-sync (the timers are APScheduler jobs).

Requests coalesce: however many changes arrive during a pass, exactly one more pass follows, so no
change is lost and passes never overlap. A catalog change costs what it changes: the desired state is
kept per service (DesiredBook) and the pass reads and plans only the virtual services whose desired value
changed; the periodic re-sync, drain deadlines and retries after a failure run full passes.

A pass without a trustworthy catalog changes nothing (fail static); shutting down leaves the kernel as it
is, so restarting or upgrading the agent never disturbs a connection.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from bridge.catalog.source import CatalogSource, CatalogUnavailable, FileSource, FileStamp, file_stamp
from bridge.config import Config, ConfigError
from bridge.dataplane.diff import Memory
from bridge.dataplane.kernel import ApplyError, Kernel
from bridge.dataplane.ops import VsKey
from bridge.dataplane.view import Dataplane, KernelView, ShadowKernel
from bridge.desired import DesiredBook
from bridge.maintenance import maintenance_json, read_maintenance
from bridge.model import Snapshot
from bridge.reconcile import PassOutcome, announce_decision, backend_pass, director_pass
from bridge.store import Stored, load_state, save_state

log = logging.getLogger("maglev-bridge")
logging.getLogger("apscheduler").setLevel(logging.WARNING)
RETRY_SECONDS = 5.0


class Agent:
    def __init__(self, config: Config, source: CatalogSource) -> None:
        self.config = config
        self.source = source
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        self.book = DesiredBook(config)
        self._wanted = threading.Event()
        self._reasons: list[str] = []
        self._full_wanted = True
        self._reasons_lock = threading.Lock()
        self._stopping = threading.Event()
        self._dataplane: Dataplane | None = None
        self._kernel: Kernel | None = None
        self._local_address = "0.0.0.0"
        self._memory: Memory | None = None
        self._unapplied: set[VsKey] = set()
        self._scope_size = 0
        self.synced = False
        self._said_waiting = False
        self.last_error: str | None = None
        self.last_pass_at: float | None = None
        self.last_pass: dict[str, Any] | None = None
        """What the last pass was: full or how many services it was scoped to, its duration, its operations."""
        self.passes = 0
        self.gate_open = False
        """A full pass has been applied without failures: from now on any pass may add announcements."""
        self._maintenance_seen: FileStamp | None = None

    # ---- requests --------------------------------------------------------------------------------

    def request(self, reason: str, full: bool = True) -> None:
        """Ask for a pass. Catalog changes ask for a small one (`full=False`): only the virtual services
        whose desired value changed are read and planned. Anything else asks for a full one."""
        with self._reasons_lock:
            self._reasons.append(reason)
            self._full_wanted = self._full_wanted or full
        self._wanted.set()

    def catalog_changed(self, reason: str) -> None:
        self.request(reason, full=False)

    def _take_request(self) -> tuple[str, bool]:
        with self._reasons_lock:
            reasons, self._reasons = self._reasons, []
            full, self._full_wanted = self._full_wanted, False
        return ", ".join(dict.fromkeys(reasons)) or "request", full

    def _carry_over(self, reason: str, full: bool) -> None:
        """A pass that could not run leaves its request pending for the next one, which the next catalog
        change (or timer) brings: a full pass asked for at start must not shrink to a small one."""
        with self._reasons_lock:
            self._reasons.insert(0, reason)
            self._full_wanted = self._full_wanted or full

    # ---- passes ----------------------------------------------------------------------------------

    def sync(self, reason: str, full: bool = True) -> PassOutcome | None:
        try:
            snapshot = self.source.snapshot()
        except CatalogUnavailable as exc:
            self.last_error = f"catalog unavailable: {exc}"
            self._carry_over(reason, full)
            if self.synced:
                log.warning("%s: catalog unavailable, keeping the kernel as it is: %s", reason, exc)
            elif not self._said_waiting:
                log.info("waiting for a complete catalog before the first pass: %s", exc)
                self._said_waiting = True
            return None
        now = time.time()
        started = time.monotonic()
        try:
            outcome = self._pass(snapshot, full, now)
        except (ApplyError, OSError) as exc:
            self.last_error = f"pass failed: {exc}"
            log.error("%s: pass failed, will retry: %s", reason, exc)
            self.close_dataplane()
            self._retry_in(RETRY_SECONDS)
            return None
        self.synced = True
        self.last_error = None
        self.last_pass_at = now
        self.passes += 1
        self._log(reason, outcome)
        self.last_pass = {"reason": reason, "scope": "full" if full or self.config.role == "backend"
                          else f"{self._scope_size} virtual service(s)",
                          "milliseconds": round(1000 * (time.monotonic() - started), 1),
                          "operations": len(outcome.steps), "failed": len(outcome.failed)}
        if outcome.steps or full:
            save_state(self.config.state_file, Stored(self._memory or Memory(), outcome.report(now)))
        if outcome.failed:
            self._retry_in(RETRY_SECONDS)
        self._schedule_drain()
        return outcome

    def _pass(self, snapshot: Snapshot, full: bool, now: float) -> PassOutcome:
        if self.config.role == "backend":
            return backend_pass(snapshot, self.config, dry_run=self.config.dataplane == "shadow", now=now)
        self._unapplied |= self.book.update(snapshot)
        dataplane = self._open_dataplane(refresh=full)
        if self._memory is None:
            self._memory = load_state(self.config.state_file).memory
        scope = None if full else frozenset(self._unapplied)
        self._scope_size = len(scope or ())
        desired = self.book.state(self._local_address)
        announce = announce_decision(desired, self.config, full_pass=full, gate_open=self.gate_open)
        if scope is not None and not scope and announce is None:
            return PassOutcome("director", False, (), desired.rejected, (), desired)
        outcome, self._memory = director_pass(desired, self.config, dataplane, self._memory,
                                              apply=True, now=now, scope=scope, announce=announce)
        self._unapplied.clear()
        if full and not outcome.failed:
            self.gate_open = True
        if self.config.dataplane == "shadow":
            outcome = replace(outcome, applied=False)
        return outcome

    def _open_dataplane(self, refresh: bool) -> Dataplane:
        """The kernel, kept open between passes; in shadow mode a model seeded from it once."""
        if self._dataplane is not None and not refresh:
            return self._dataplane
        if self._kernel is None:
            self._kernel = Kernel(self.config)
        if self._dataplane is None:
            if self.config.dataplane == "shadow":
                self._dataplane = self._shadow(self._kernel)
            else:
                self._dataplane = KernelView(self._kernel)
        self._local_address = self._tunnel_source(self._kernel)
        return self._dataplane

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

    def close_dataplane(self) -> None:
        if self._kernel is not None:
            self._kernel.close()
        self._kernel = None
        self._dataplane = None
        with self._reasons_lock:
            self._full_wanted = True

    def _retry_in(self, seconds: float) -> None:
        when = datetime.now() + timedelta(seconds=seconds)
        self.scheduler.add_job(self.request, "date", run_date=when, args=["retry"], id="retry", replace_existing=True)

    def _log(self, reason: str, outcome: PassOutcome) -> None:
        if not outcome.steps:
            log.info("%s: nothing to change", reason)
            return
        verb = "applied" if outcome.applied else "shadow mode, would run"
        log.info("%s: %s %d operation(s)", reason, verb, len(outcome.steps))
        for note in outcome.notes:
            log.info("  note: %s", note)
        for step in outcome.steps:
            if step.error:
                log.error("  FAILED %s: %s", step.description, step.error)
            else:
                log.info("  %s", step.description)

    def _schedule_drain(self) -> None:
        now = time.time()
        memory = self._memory if self._memory is not None else load_state(self.config.state_file).memory
        deadlines = [d for d in memory.drain_deadlines.values() if d > now]
        if deadlines:
            when = datetime.fromtimestamp(min(deadlines)) + timedelta(milliseconds=50)
            self.scheduler.add_job(self.request, "date", run_date=when, args=["drain deadline"], id="drain",
                                   replace_existing=True)

    def watch_maintenance(self) -> None:
        """Once a second (a stat): `maintenance on|off` asks for a pass at once; the pass reads the file. A
        full one: `maintenance on` has already deleted the announcements itself, so the cached view of the
        announce table is stale, and withdrawing what is gone would fail."""
        assert self.config.bgp is not None
        seen = file_stamp(self.config.bgp.maintenance_file)
        if seen != self._maintenance_seen:
            self._maintenance_seen = seen
            self.request(f"maintenance {'on' if seen else 'off'}")

    def state(self) -> dict[str, Any]:
        """For /health and status: ready only after the first complete pass."""
        catalog = self.source.state()
        bgp = self.config.bgp
        announcing: dict[str, Any] | None = None
        if bgp is not None and self.config.role == "director":
            announcing = {"table": bgp.table, "gate": "open" if self.gate_open
                          else "closed: waiting for a full pass applied without failures"}
        return {
            "maintenance": maintenance_json(read_maintenance(bgp.maintenance_file) if bgp else None),
            "announcing": announcing,
            "ready": self.synced,
            "degraded": self.last_error is not None or not catalog.get("ok", True),
            "synced": self.synced,
            "role": self.config.role,
            "dataplane": self.config.dataplane,
            "passes": self.passes,
            "last_pass_at": self.last_pass_at,
            "last_pass": self.last_pass,
            "last_error": self.last_error,
            "catalog": catalog,
        }

    # ---- lifecycle -------------------------------------------------------------------------------

    def work(self) -> None:
        """The reconcile worker: one pass per wake-up, until stopped."""
        while not self._stopping.is_set():
            self._wanted.wait()
            self._wanted.clear()
            if self._stopping.is_set():
                break
            self.sync(*self._take_request())
        self.close_dataplane()

    def keep_jobs(self) -> None:
        from bridge.nomad.keeper import keep_jobs

        for line in keep_jobs(self.config):
            log.info("nomad jobs: %s", line)

    def start(self) -> None:
        self.scheduler.add_job(self.request, "interval", seconds=self.config.resync_interval, args=["resync"],
                               id="resync")
        if self.config.nomad is not None and self.config.nomad.keep_interval > 0:
            self.scheduler.add_job(self.keep_jobs, "interval", seconds=self.config.nomad.keep_interval, id="nomad-jobs",
                                   next_run_time=datetime.now())
        if self.config.bgp is not None and self.config.role == "director":
            self._maintenance_seen = file_stamp(self.config.bgp.maintenance_file)
            self.scheduler.add_job(self.watch_maintenance, "interval", seconds=1, id="maintenance")
        self.scheduler.start()
        self.source.start(self.catalog_changed)
        self.request("start")

    def stop(self) -> None:
        self._stopping.set()
        self._wanted.set()
        self.source.stop()
        self.scheduler.shutdown(wait=False)

    def run(self) -> int:
        from bridge.http import serve

        server = serve(self)
        announcer = None
        if self.config.consul is not None and self.config.consul.register:
            from bridge.announce import Announcer

            announcer = Announcer(self.config)
            announcer.start()
        self.start()

        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping; the kernel state stays as it is", signum)
            self.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("agent started: role %s, dataplane %s, http %s", self.config.role, self.config.dataplane,
                 self.config.http_bind)
        self.work()
        if announcer is not None:
            announcer.stop()
        server.shutdown()
        log.info("stopped")
        return 0


def source_for(config: Config) -> CatalogSource:
    if config.catalog_file:
        return FileSource(config.catalog_file)
    if config.consul is not None:
        from bridge.catalog.consul import ConsulSource

        return ConsulSource(config)
    raise ConfigError("catalog_file: the agent needs a catalog source (a consul section, catalog_file or --catalog)")


def run_agent(config: Config) -> int:
    return Agent(config, source_for(config)).run()
