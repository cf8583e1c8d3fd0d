"""The long-running agent: one reconcile worker fed by catalog changes, drain deadlines and a periodic
full re-sync (the timers are APScheduler jobs).

Requests coalesce: however many changes arrive during a pass, exactly one more pass follows, so no
change is lost and passes never overlap. A pass without a trustworthy catalog changes nothing (fail
static); shutting down leaves the kernel as it is, so restarting or upgrading the agent never disturbs
a connection.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import datetime, timedelta
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from bridge.catalog.source import CatalogSource, CatalogUnavailable, FileSource
from bridge.config import Config, ConfigError
from bridge.dataplane.kernel import ApplyError, open_kernel
from bridge.model import Snapshot
from bridge.reconcile import PassOutcome, backend_pass, director_pass
from bridge.store import Stored, load_state, save_state

log = logging.getLogger("maglev-bridge")
logging.getLogger("apscheduler").setLevel(logging.WARNING)


class Agent:
    def __init__(self, config: Config, source: CatalogSource) -> None:
        self.config = config
        self.source = source
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        self._wanted = threading.Event()
        self._reasons: list[str] = []
        self._reasons_lock = threading.Lock()
        self._stopping = threading.Event()
        self.synced = False
        self.last_error: str | None = None
        self.last_pass_at: float | None = None
        self.passes = 0

    # ---- requests --------------------------------------------------------------------------------

    def request(self, reason: str) -> None:
        with self._reasons_lock:
            self._reasons.append(reason)
        self._wanted.set()

    def _take_reasons(self) -> str:
        with self._reasons_lock:
            reasons, self._reasons = self._reasons, []
        return ", ".join(dict.fromkeys(reasons)) or "request"

    # ---- passes ----------------------------------------------------------------------------------

    def sync(self, reason: str) -> PassOutcome | None:
        try:
            snapshot = self.source.snapshot()
        except CatalogUnavailable as exc:
            self.last_error = f"catalog unavailable: {exc}"
            log.warning("%s: catalog unavailable, keeping the kernel as it is: %s", reason, exc)
            return None
        try:
            outcome = self._pass(snapshot)
        except (ApplyError, OSError) as exc:
            self.last_error = f"pass failed: {exc}"
            log.error("%s: pass failed, will retry: %s", reason, exc)
            return None
        if not outcome.applied:
            stored = load_state(self.config.state_file)
            save_state(self.config.state_file, Stored(stored.memory, outcome.report(time.time())))
        self.synced = True
        self.last_error = None
        self.last_pass_at = time.time()
        self.passes += 1
        self._log(reason, outcome)
        self._schedule_drain()
        return outcome

    def _pass(self, snapshot: Snapshot) -> PassOutcome:
        dry_run = self.config.dataplane == "shadow"
        if self.config.role == "backend":
            return backend_pass(snapshot, self.config, dry_run=dry_run)
        with open_kernel(self.config) as kernel:
            return director_pass(snapshot, self.config, kernel, dry_run=dry_run)

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
        deadlines = [d for d in load_state(self.config.state_file).memory.drain_deadlines.values() if d > now]
        if deadlines:
            when = datetime.fromtimestamp(min(deadlines)) + timedelta(milliseconds=50)
            self.scheduler.add_job(self.request, "date", run_date=when, args=["drain deadline"], id="drain",
                                   replace_existing=True)

    def state(self) -> dict[str, Any]:
        """For /health and status: ready only after the first complete pass."""
        catalog = self.source.state()
        return {
            "ready": self.synced,
            "degraded": self.last_error is not None or not catalog.get("ok", True),
            "synced": self.synced,
            "role": self.config.role,
            "dataplane": self.config.dataplane,
            "passes": self.passes,
            "last_pass_at": self.last_pass_at,
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
            self.sync(self._take_reasons())

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
        self.scheduler.start()
        self.source.start(self.request)
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
