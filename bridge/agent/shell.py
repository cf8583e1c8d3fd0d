"""The long-running agent, a thin shell: it wires the catalog source to the trigger (requests merged into
passes), one reconcile worker that runs the role's reconciler, the timers (APScheduler: periodic full
re-sync, drain deadlines, retries with backoff, the state file's retry, the role's watches, the Nomad job
keeper), signals (SIGHUP reloads), the HTTP endpoint and the Consul registration.

Requests coalesce (bridge/agent/trigger.py): however many changes arrive during a pass, exactly one more
pass follows, so no change is lost and passes never overlap. A catalog change asks for a scoped pass; the
periodic re-sync, drain deadlines and retries after a failure ask for full ones.

A pass without a trustworthy catalog changes nothing (fail static); shutting down leaves the kernel as it
is, so restarting or upgrading the agent never disturbs a connection.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import fields, replace
from datetime import datetime, timedelta
from functools import partial
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from bridge import version
from bridge.agent.reconcile import Reconciler, Stage
from bridge.agent.record import PassRecord
from bridge.agent.state_file import RETRY_SECONDS as STATE_RETRY_SECONDS
from bridge.agent.state_file import StateFile
from bridge.agent.trigger import Request, Trigger
from bridge.catalog.source import CatalogSource, CatalogUnavailable, FileSource
from bridge.core.config import Config, ConfigError
from bridge.core.live import LiveState
from bridge.core.memory import Memory
from bridge.core.model import DesiredState, Rejection
from bridge.core.outcome import PassOutcome
from bridge.inspect.metrics import Metrics

log = logging.getLogger("maglev-bridge")
logging.getLogger("apscheduler").setLevel(logging.WARNING)
LIVE_KEYS = frozenset({"vip_cidrs", "tunnel_map", "local_address", "fou_port", "drain_timeout", "resync_interval",
                       "default_flags", "default_allow", "warning_serves", "mh_table_size", "encapsulation",
                       "standby_encapsulation", "retire_encapsulation", "gue_port", "gue_checksum", "receive"})
"""What SIGHUP changes in a running agent: what each pass reads from the configuration. Everything else
is built once at start (the catalog source, the HTTP endpoint, the state file and its lock, the data-plane
mode, the Consul registration) or names what the agent owns in the kernel (route_protocol, link_prefix,
tag_prefix), so it needs a restart, which the log says."""


class Agent:
    def __init__(self, reconciler: Reconciler, source: CatalogSource,
                 reload: Callable[[], Config] | None = None) -> None:
        self.reconciler = reconciler
        self.source = source
        self._reload = reload
        """Reads and validates the configuration again (SIGHUP); None: reloading is not possible."""
        self._reload_wanted = False
        self.trigger = Trigger()
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        self.state_file = StateFile(reconciler.config.state_file)
        self._stopping = threading.Event()
        self.record = PassRecord()
        self.metrics = Metrics()
        self.metrics.watch(self)

    @property
    def config(self) -> Config:
        """The running configuration: the reconciler's, which every pass reads."""
        return self.reconciler.config

    @config.setter
    def config(self, config: Config) -> None:
        self.reconciler.config = config

    # ---- passes ----------------------------------------------------------------------------------

    def sync(self, reason: str, full: bool = True) -> PassOutcome | None:
        """One pass, and the boundary no exception crosses: whatever goes wrong in a stage is logged with
        the stage (and the service, when the desired state names it), counted, shown in /health, and the
        pass is retried with backoff; the kernel keeps what it has (fail static)."""
        request, stage = Request(reason, full), Stage("catalog snapshot")
        try:
            return self._sync(request, stage)
        except Exception as exc:
            self._pass_failed(request, stage.name, exc)
            return None

    def _sync(self, request: Request, stage: Stage) -> PassOutcome | None:
        reason, full = request
        try:
            snapshot = self.source.snapshot()
        except CatalogUnavailable as exc:
            self.record.unavailable(reason, exc)
            self.trigger.carry_over(request)
            return None
        now = time.time()
        self.record.catalog_at = now
        started = time.monotonic()
        memory = self.state_file.memory
        if memory is None:
            stage.name = "state load"
            memory = self.state_file.recover()
        done = self.reconciler.reconcile(snapshot, memory, full=full, now=now, stage=stage)
        self.state_file.memory = done.memory
        outcome = done.outcome
        stage.name = "report"
        self.metrics.observe(done.scope is None, time.monotonic() - started, len(outcome.steps), len(outcome.failed))
        rejections_changed = self.record.done(reason, outcome, done.scope, started, now)
        if outcome.steps or full or rejections_changed:
            stage.name = "state save"
            if not self.state_file.save(outcome.report(now)):
                self._retry_save()
        if outcome.failed:
            self._retry_in(self.record.retry_delay())
        stage.name = "drain schedule"
        self._schedule_drain()
        return outcome

    def _flush_state(self) -> None:
        if not self.state_file.flush():
            self._retry_save()

    def _retry_save(self) -> None:
        """The state file is retried every STATE_RETRY_SECONDS and after every pass until a save succeeds."""
        self._at(_after(STATE_RETRY_SECONDS), "state-save", self._flush_state)

    def _pass_failed(self, request: Request, stage: str, exc: Exception) -> None:
        """Count and show the failure; the next pass reads everything again (it may have applied part of
        its operations) and follows after a backoff that grows while the failure repeats."""
        delay = self.record.failed(request.reason, stage, exc)
        self.trigger.carry_over(request)
        self.trigger.want_full()
        self.reconciler.failed()
        self._retry_in(delay)

    def close_dataplane(self) -> None:
        """Release the kernel; the next pass opens it again and reads all of it."""
        self.reconciler.close()
        self.trigger.want_full()

    def _at(self, when: datetime, job: str, action: Callable[..., None], *args: object) -> None:
        """One timer; a newer one of the same name replaces it."""
        self.scheduler.add_job(action, "date", run_date=when, args=list(args), id=job, replace_existing=True)

    def _retry_in(self, seconds: float) -> None:
        self._at(_after(seconds), "retry", self.trigger.request, "retry")

    def _schedule_drain(self) -> None:
        now = time.time()
        deadlines = [d for d in self.memory.drain_deadlines.values() if d > now]
        if deadlines:
            when = datetime.fromtimestamp(min(deadlines)) + timedelta(milliseconds=50)
            self._at(when, "drain", self.trigger.request, "drain deadline")

    def watch(self, changed: Callable[[], str | None]) -> None:
        """A role's watch (its timer): a change asks for a full pass at once."""
        reason = changed()
        if reason is not None:
            self.trigger.request(reason)

    @property
    def memory(self) -> Memory:
        return self.state_file.memory or Memory()

    @property
    def rejected(self) -> tuple[Rejection, ...]:
        """The claims the last pass refused."""
        return self.record.rejected

    @property
    def desired(self) -> DesiredState | None:
        """The last pass's desired state."""
        return self.record.desired

    def shadow_state(self) -> LiveState | None:
        """Shadow mode's model of what /metrics reads from the kernel (the IPVS table, announced VIPs, the
        filter); else None."""
        return self.reconciler.shadow_state()

    def health(self) -> dict[str, Any]:
        """For /health and status: ready only after the first complete pass."""
        catalog = self.source.health()
        role = self.reconciler.health()
        record = self.record
        return {
            "maintenance": role.maintenance,
            "announcing": role.announcing,
            "ready": record.synced,
            "degraded": record.last_error is not None or self.state_file.error is not None
                        or bool(role.failures) or not catalog.get("ok", True),
            "synced": record.synced,
            "role": self.config.role,
            "version": version(),
            "dataplane": self.config.dataplane,
            "encapsulation": self.config.encapsulation,
            "passes": record.passes,
            "last_pass_at": record.last_pass_at,
            "last_success_at": record.last_success_at,
            "last_pass": record.last_pass,
            "last_error": record.last_error,
            "fail_static": record.synced and record.last_error is not None,
            "catalog_at": record.catalog_at,
            "pending_services": role.pending,
            "errors": {"passes_failed": record.errors, "last": record.last_failure,
                       "services": dict(sorted(role.failures.items())[:20])},
            "catalog": catalog,
            "state_file": self.state_file.health(),
        }

    # ---- lifecycle -------------------------------------------------------------------------------

    def work(self) -> None:
        """The reconcile worker: one pass per wake-up, until stopped; a reload asked for by SIGHUP runs
        here, between passes, never inside one."""
        while not self._stopping.is_set():
            self.trigger.wait()
            if self._stopping.is_set():
                break
            if self._reload_wanted:
                self._reload_wanted = False
                self.reload_config()
            self.sync(*self.trigger.take())
        self.close_dataplane()

    def reload_config(self) -> None:
        """Read the configuration again and validate it in full; a bad one is logged and the running one
        kept. Of a good one, the LIVE_KEYS take effect now (a fresh desired state and a full pass); every
        other changed key is logged as needing a restart and keeps its running value."""
        assert self._reload is not None
        try:
            new = self._reload()
        except (ConfigError, OSError) as exc:
            log.error("SIGHUP: the new configuration is not valid, keeping the running one: %s", exc)
            return
        except Exception:  # a bug in reading it must not end the worker, which runs the reload between passes
            log.exception("SIGHUP: the new configuration could not be read, keeping the running one")
            return
        changed = [f.name for f in fields(Config) if getattr(new, f.name) != getattr(self.config, f.name)]
        live = [key for key in changed if key in LIVE_KEYS]
        restart = [key for key in changed if key not in LIVE_KEYS]
        if restart:
            log.warning("SIGHUP: changed key(s) %s need a restart; they keep their running values until then",
                        ", ".join(restart))
        if not live:
            log.info("SIGHUP: configuration reloaded; nothing that can change live changed")
            return
        old = self.config
        self.reconciler.reconfigure(replace(old, **{key: getattr(new, key) for key in live}))
        if old.resync_interval != self.config.resync_interval and self.scheduler.get_job("resync") is not None:
            self.scheduler.reschedule_job("resync", trigger="interval", seconds=self.config.resync_interval)
        log.info("SIGHUP: configuration reloaded; now in effect: %s", ", ".join(live))
        self.trigger.request("configuration reloaded")

    def keep_jobs(self) -> None:
        from bridge.nomad.keeper import keep_jobs

        for line in keep_jobs(self.config):
            log.info("nomad jobs: %s", line)

    def start(self) -> None:
        self.scheduler.add_job(self.trigger.request, "interval", seconds=self.config.resync_interval,
                               args=["resync"], id="resync")
        if self.config.nomad is not None and self.config.nomad.keep_interval > 0:
            self.scheduler.add_job(self.keep_jobs, "interval", seconds=self.config.nomad.keep_interval, id="nomad-jobs",
                                   next_run_time=datetime.now())
        for watch in self.reconciler.watches():
            self.scheduler.add_job(self.watch, "interval", seconds=watch.seconds, args=[watch.changed], id=watch.name)
        self.scheduler.start()
        self.source.start(partial(self.trigger.request, full=False))
        self.trigger.request("start")

    def stop(self) -> None:
        self._stopping.set()
        self.trigger.wake()
        self.source.stop()
        if self.scheduler.running:  # a SIGTERM during start-up comes before the scheduler runs
            self.scheduler.shutdown(wait=False)

    def _handle_signals(self) -> None:
        """SIGTERM/SIGINT stop (the kernel stays as it is); SIGHUP (systemd's reload, Nomad's change_mode
        "signal") reloads the configuration; SIGUSR1/SIGUSR2, whose default would kill the agent, are logged
        and ignored; SIGPIPE is ignored (a closed socket is an error on that socket, not the agent's end)."""

        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("%s: stopping; the kernel state stays as it is", signal.Signals(signum).name)
            self.stop()

        def reload(_signum: int, _frame: FrameType | None) -> None:
            log.info("SIGHUP: reloading the configuration")
            self._reload_wanted = True
            self.trigger.wake()

        def ignore(signum: int, _frame: FrameType | None) -> None:
            log.info("%s ignored (SIGHUP reloads the configuration, SIGTERM stops)", signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload if self._reload is not None else ignore)
        signal.signal(signal.SIGUSR1, ignore)
        signal.signal(signal.SIGUSR2, ignore)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def run(self) -> int:
        from bridge.agent.http import serve

        self._handle_signals()
        self.state_file.recover()  # before /health answers
        server = serve(self)
        announcer = None
        if self.config.consul is not None and self.config.consul.register:
            from bridge.catalog.registration import Announcer

            announcer = Announcer(self.config)
            announcer.start()
        self.start()
        log.info("agent started: role %s, dataplane %s, http %s, pid %d", self.config.role, self.config.dataplane,
                 self.config.http_address.netloc, os.getpid())
        # The worker has a thread of its own and this one only waits: Python runs a signal handler in the
        # main thread between two of its bytecodes, and a handler that wakes the trigger while that same thread
        # holds its Event's lock (inside the worker's own wait or clear) would wait for itself forever.
        worker = threading.Thread(target=self.work, name="worker")
        worker.start()
        worker.join()
        crashed = not self._stopping.is_set()
        if crashed:
            log.error("the worker stopped unexpectedly (see the traceback above); stopping")
            self.stop()
        if announcer is not None:
            announcer.stop()
        server.stop()
        log.info("stopped")
        return 1 if crashed else 0


def source_for(config: Config) -> CatalogSource:
    if config.catalog_file:
        return FileSource(config.catalog_file)
    if config.consul is not None and config.role == "backend":
        from bridge.catalog.node import NodeSource

        return NodeSource(config)
    if config.consul is not None:
        from bridge.catalog.consul import ConsulSource

        return ConsulSource(config)
    raise ConfigError("catalog_file: the agent needs a catalog source (a consul section, catalog_file or --catalog)")


def run_agent(reconciler: Reconciler, reload: Callable[[], Config] | None = None) -> int:
    return Agent(reconciler, source_for(reconciler.config), reload).run()


def _after(seconds: float) -> datetime:
    return datetime.now() + timedelta(seconds=seconds)
