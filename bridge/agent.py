"""The long-running agent: a reconcile loop driven by catalog changes, drain deadlines and a periodic
full re-sync, all scheduled with APScheduler on a single worker so passes never overlap.

A pass that cannot read the catalog changes nothing (fail static); shutting down leaves the kernel as it
is, so restarting or upgrading the agent never disturbs a connection.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import FrameType

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.blocking import BlockingScheduler

from bridge.catalog.consul_format import CatalogFormatError
from bridge.catalog.file import load_catalog
from bridge.config import Config, ConfigError
from bridge.dataplane.kernel import ApplyError, open_kernel
from bridge.model import Snapshot
from bridge.reconcile import PassOutcome, backend_pass, director_pass
from bridge.store import load_state

log = logging.getLogger("maglev-bridge")
FILE_CHECK_INTERVAL = 1.0


@dataclass(frozen=True)
class FileStamp:
    mtime_ns: int
    size: int
    inode: int


def _stamp(path: str) -> FileStamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileStamp(st.st_mtime_ns, st.st_size, st.st_ino)


class Agent:
    def __init__(self, config: Config) -> None:
        if not config.catalog_file:
            raise ConfigError("catalog_file: the agent needs a catalog source (catalog_file, or --catalog)")
        self.config = config
        self.catalog_file = config.catalog_file
        self.scheduler = BlockingScheduler(
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        )
        self._lock = threading.Lock()
        self._seen: FileStamp | None = None
        self.synced = False

    def snapshot(self) -> Snapshot:
        return load_catalog(self.catalog_file)

    def sync(self, reason: str) -> PassOutcome | None:
        with self._lock:
            try:
                snapshot = self.snapshot()
            except CatalogFormatError as exc:
                log.error("catalog unreadable, keeping the kernel as it is: %s", exc)
                return None
            try:
                outcome = self._pass(snapshot)
            except (ApplyError, OSError) as exc:
                log.error("pass failed (%s), will retry: %s", reason, exc)
                return None
            self.synced = True
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
        verb = "applied" if outcome.applied else "shadow: would run"
        if outcome.steps:
            log.info("%s: %s %d operation(s)", reason, verb, len(outcome.steps))
        for step in outcome.steps:
            if step.error:
                log.error("  FAILED %s: %s", step.description, step.error)
            else:
                log.info("  %s", step.description)
        for rejection in outcome.rejected:
            log.debug("rejected %s/%s %r: %s", rejection.service, rejection.instance, rejection.tag, rejection.reason)

    def _schedule_drain(self) -> None:
        deadlines = [d for d in load_state(self.config.state_file).memory.drain_deadlines.values() if d > time.time()]
        if not deadlines:
            return
        when = datetime.fromtimestamp(min(deadlines)) + timedelta(milliseconds=50)
        self.scheduler.add_job(self.sync, "date", run_date=when, args=["drain deadline"], id="drain",
                               replace_existing=True)

    def check_file(self) -> None:
        stamp = _stamp(self.catalog_file)
        if stamp != self._seen:
            self._seen = stamp
            self.sync("catalog changed")

    def run(self) -> int:
        self._seen = _stamp(self.catalog_file)
        self.sync("start")
        self.scheduler.add_job(self.check_file, "interval", seconds=FILE_CHECK_INTERVAL, id="watch")
        self.scheduler.add_job(self.sync, "interval", seconds=self.config.resync_interval, args=["resync"],
                               id="resync")

        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping; the kernel state stays as it is", signum)
            self.scheduler.shutdown(wait=False)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("agent started: role %s, dataplane %s, catalog %s", self.config.role, self.config.dataplane,
                 self.catalog_file)
        self.scheduler.start()
        return 0


def run_agent(config: Config) -> int:
    return Agent(config).run()
