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
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from bridge import version
from bridge.agent.reconcile import announce_decision, backend_pass, director_pass
from bridge.catalog.source import CatalogSource, CatalogUnavailable, FileSource, FileStamp, file_stamp
from bridge.core.config import Config, ConfigError
from bridge.core.desired import DesiredBook
from bridge.core.keys import ServiceKey
from bridge.core.live import LiveState
from bridge.core.memory import Memory
from bridge.core.model import DesiredState, Rejection, Snapshot
from bridge.core.outcome import PassOutcome
from bridge.dataplane.kernel import ApplyError, Kernel
from bridge.dataplane.shadow import ShadowKernel
from bridge.dataplane.view import Dataplane, KernelView
from bridge.files.maintenance import maintenance_json, read_maintenance
from bridge.files.store import Stored, load_state, recover_state, save_state
from bridge.inspect.metrics import Metrics
from bridge.inspect.text import rejections_text

log = logging.getLogger("maglev-bridge")
logging.getLogger("apscheduler").setLevel(logging.WARNING)
RETRY_SECONDS = 5.0
RETRY_MAX = 300.0
STATE_RETRY_SECONDS = 10.0
LIVE_KEYS = frozenset({"vip_cidrs", "tunnel_map", "local_address", "fou_port", "drain_timeout", "resync_interval",
                       "default_flags", "default_allow", "warning_serves", "mh_table_size"})
"""What SIGHUP changes in a running agent: what each pass reads from the configuration. Everything else
is built once at start (the catalog source, the HTTP endpoint, the state file and its lock, the data-plane
mode, the Consul registration) or names what the agent owns in the kernel (route_protocol, link_prefix,
tag_prefix), so it needs a restart, which the log says."""


@dataclass
class _Stage:
    """Which stage a pass is in, so a failure says where it happened."""

    name: str


class Agent:
    def __init__(self, config: Config, source: CatalogSource, reload: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.source = source
        self._reload = reload
        """Reads and validates the configuration again (SIGHUP); None: reloading is not possible."""
        self._reload_wanted = False
        self._save_lock = threading.Lock()
        self._unsaved: Stored | None = None
        self.state_error: str | None = None
        """Why the state file could not be saved, until a save succeeds again."""
        self.state_lost: str | None = None
        """What was lost when a bad state file was moved aside at start."""
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
        self._unapplied: set[ServiceKey] = set()
        self._scope_size = 0
        self.synced = False
        self._said_waiting = False
        self.last_error: str | None = None
        self.last_pass_at: float | None = None
        self.last_pass: dict[str, Any] | None = None
        """What the last pass was: full or how many services it was scoped to, its duration, its operations."""
        self.passes = 0
        self.errors = 0
        """Passes that failed with an exception, since start."""
        self._failures = 0
        self.last_failure: dict[str, Any] | None = None
        self._rejected: tuple[Rejection, ...] = ()
        self._backend_failures: dict[str, str] = {}
        """The backend role's services whose claims could not be computed (the director's are the book's)."""
        self.gate_open = False
        """A full pass has been applied without failures: from now on any pass may add announcements."""
        self._maintenance_seen: FileStamp | None = None
        self.catalog_at: float | None = None
        """When the last complete catalog was read: its age is how stale a fail-static director is."""
        self.desired: DesiredState | None = None
        """The last pass's desired state (its weights are what /metrics compares the kernel's with)."""
        self.metrics = Metrics()
        self.metrics.watch(self)

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
        """One pass, and the boundary no exception crosses: whatever goes wrong in a stage is logged with
        the stage (and the service, when the desired state names it), counted, shown in /health, and the
        pass is retried with backoff; the kernel keeps what it has (fail static)."""
        stage = _Stage("catalog snapshot")
        try:
            return self._sync(reason, full, stage)
        except Exception as exc:
            self._pass_failed(reason, full, stage.name, exc)
            return None

    def _sync(self, reason: str, full: bool, stage: _Stage) -> PassOutcome | None:
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
        self.catalog_at = now
        started = time.monotonic()
        outcome = self._pass(snapshot, full, now, stage)
        stage.name = "report"
        whole = full or self.config.role == "backend"
        self.metrics.observe(whole, time.monotonic() - started, len(outcome.steps), len(outcome.failed))
        self.desired = outcome.desired or self.desired
        self._backend_failures = dict(outcome.failures)
        self.synced = True
        self.last_error = None
        self._failures = self._failures + 1 if outcome.failed else 0
        self.last_pass_at = now
        self.passes += 1
        self._log(reason, outcome)
        self.last_pass = {"reason": reason, "scope": "full" if whole else f"{self._scope_size} virtual service(s)",
                          "milliseconds": round(1000 * (time.monotonic() - started), 1),
                          "operations": len(outcome.steps), "failed": len(outcome.failed),
                          "rejected": len(outcome.rejected)}
        rejections_changed = outcome.rejected != self._rejected
        self._rejected = outcome.rejected
        if outcome.steps or full or rejections_changed:
            stage.name = "state save"
            self._save_state(now, outcome)
        if outcome.failed:
            self._retry_in(self._retry_delay())
        stage.name = "drain schedule"
        self._schedule_drain()
        return outcome

    def _save_state(self, now: float, outcome: PassOutcome) -> None:
        with self._save_lock:
            self._unsaved = Stored(self._memory or Memory(), outcome.report(now))
        self._flush_state()

    def _flush_state(self) -> None:
        """Write the latest unsaved state. A failure (read-only or full disk, directory gone) never fails
        the pass: the memory stays in RAM, /health says the file is not saved and why, and the write is
        retried every STATE_RETRY_SECONDS and after every pass until it succeeds."""
        with self._save_lock:
            if self._unsaved is None:
                return
            try:
                save_state(self.config.state_file, self._unsaved)
            except OSError as exc:
                error = f"{self.config.state_file}: {exc.strerror or exc}"
                if error != self.state_error:
                    log.warning("state file not saved, keeping it in memory and retrying every %.0f s: %s",
                                STATE_RETRY_SECONDS, error)
                self.state_error = error
                when = datetime.now() + timedelta(seconds=STATE_RETRY_SECONDS)
                self.scheduler.add_job(self._flush_state, "date", run_date=when, id="state-save",
                                       replace_existing=True)
                return
            self._unsaved = None
            if self.state_error is not None:
                log.info("state file saved again: %s", self.config.state_file)
                self.state_error = None

    def _recover_memory(self) -> Memory:
        """The state file's memory; a bad file is moved aside, said once, and the director starts without."""
        stored, warning = recover_state(self.config.state_file)
        if warning:
            log.warning("%s", warning)
            self.state_lost = warning
        return stored.memory

    def _retry_delay(self) -> float:
        """One backoff for a pass that raised and one whose operations failed: an operation that fails for
        good (someone's nftables rule holding the agent's set) must not cost a full pass, a full kernel
        read and a failing transaction every 5 s forever."""
        return min(RETRY_SECONDS * 2.0 ** (self._failures - 1), RETRY_MAX)

    def _pass_failed(self, reason: str, full: bool, stage: str, exc: Exception) -> None:
        """Count and show the failure; re-read the kernel before the next pass (it may have applied part of
        its operations), which follows after a backoff that grows while the failure repeats."""
        self.errors += 1
        self._failures += 1
        message = f"{stage}: {exc.__class__.__name__}: {exc}"
        self.last_error = f"pass failed in {message}"
        self.last_failure = {"at": time.time(), "reason": reason, "stage": stage, "error": message}
        delay = self._retry_delay()
        if isinstance(exc, ApplyError | OSError):
            log.error("%s: pass failed in %s, retrying in %.0f s: %s", reason, stage, delay, exc)
        else:
            log.exception("%s: pass failed in %s, retrying in %.0f s", reason, stage, delay)
        self._carry_over(reason, full)
        if self.config.dataplane == "shadow":  # the model is what shadow mode did: keep it, re-plan in full
            with self._reasons_lock:
                self._full_wanted = True
        else:
            self.close_dataplane()
        self._retry_in(delay)

    def _pass(self, snapshot: Snapshot, full: bool, now: float, stage: _Stage) -> PassOutcome:
        if self.config.role == "backend":
            stage.name = "backend pass"
            return backend_pass(snapshot, self.config, dry_run=self.config.dataplane == "shadow", now=now)
        stage.name = "desired state"
        self._unapplied |= self.book.update(snapshot)
        stage.name = "kernel read"
        dataplane = self._open_dataplane(refresh=full)
        if self._memory is None:
            stage.name = "state load"
            self._memory = self._recover_memory()
        stage.name = "desired state"
        scope = None if full else frozenset(self._unapplied)
        desired = self.book.desired(self._local_address)
        if scope is None and self.book.unknown:
            # a service never computed may own kernel state: plan only what is known, delete nothing else
            scope = frozenset(vs.key for vs in desired.virtual_services)
        self._scope_size = len(scope or ())
        announce = announce_decision(desired, self.config, full_pass=full, gate_open=self.gate_open)
        if not full and not scope and announce is None:
            return PassOutcome("director", False, (), desired.rejected, (), desired)
        stage.name = "plan and apply"
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
        new = set(outcome.rejected) - set(self._rejected)
        for line in rejections_text([r for r in outcome.rejected if r in new]):
            log.warning("%s: %s", reason, line.strip())
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
        announce table is stale (a small pass before this one withdraws what is gone, which is not an error:
        kernel.GONE)."""
        assert self.config.bgp is not None
        seen = file_stamp(self.config.bgp.maintenance_file)
        if seen != self._maintenance_seen:
            self._maintenance_seen = seen
            self.request(f"maintenance {'on' if seen else 'off'}")

    @property
    def memory(self) -> Memory:
        return self._memory or Memory()

    @property
    def rejected(self) -> tuple[Rejection, ...]:
        """The claims the last pass refused."""
        return self._rejected

    def shadow_state(self) -> LiveState | None:
        """Shadow mode's model of what /metrics reads from the kernel (the IPVS table, announced VIPs, the
        filter); else None."""
        dataplane = self._dataplane
        if not isinstance(dataplane, ShadowKernel):
            return None
        return LiveState(tuple(dataplane.services.values()), announced=tuple(dataplane.announced),
                         filter=dataplane.filter)

    def state(self) -> dict[str, Any]:
        """For /health and status: ready only after the first complete pass."""
        catalog = self.source.health()
        failures = {**self.book.failures, **self._backend_failures}
        bgp = self.config.bgp if self.config.role == "director" else None  # a backend announces nothing
        announcing: dict[str, Any] | None = None
        if bgp is not None:
            announcing = {"table": bgp.table, "gate": "open" if self.gate_open
                          else "closed: waiting for a full pass applied without failures"}
        return {
            "maintenance": maintenance_json(read_maintenance(bgp.maintenance_file) if bgp else None),
            "announcing": announcing,
            "ready": self.synced,
            "degraded": self.last_error is not None or self.state_error is not None
                        or bool(failures) or not catalog.get("ok", True),
            "synced": self.synced,
            "role": self.config.role,
            "version": version(),
            "dataplane": self.config.dataplane,
            "passes": self.passes,
            "last_pass_at": self.last_pass_at,
            "last_pass": self.last_pass,
            "last_error": self.last_error,
            "fail_static": self.synced and self.last_error is not None,
            "catalog_at": self.catalog_at,
            "pending_services": len(self._unapplied),
            "errors": {"passes_failed": self.errors, "last": self.last_failure,
                       "services": dict(sorted(failures.items())[:20])},
            "catalog": catalog,
            "state_file": {"path": self.config.state_file, "saved": self.state_error is None,
                           "error": self.state_error, "lost_at_start": self.state_lost},
        }

    # ---- lifecycle -------------------------------------------------------------------------------

    def work(self) -> None:
        """The reconcile worker: one pass per wake-up, until stopped; a reload asked for by SIGHUP runs
        here, between passes, never inside one."""
        while not self._stopping.is_set():
            self._wanted.wait()
            self._wanted.clear()
            if self._stopping.is_set():
                break
            if self._reload_wanted:
                self._reload_wanted = False
                self.reload_config()
            self.sync(*self._take_request())
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
        old, self.config = self.config, replace(self.config, **{key: getattr(new, key) for key in live})
        self.book = DesiredBook(self.config)
        self._unapplied.clear()
        if old.vip_cidrs != self.config.vip_cidrs:
            self.close_dataplane()  # what the agent owns in the kernel changed: read it again
        if old.resync_interval != self.config.resync_interval and self.scheduler.get_job("resync") is not None:
            self.scheduler.reschedule_job("resync", trigger="interval", seconds=self.config.resync_interval)
        log.info("SIGHUP: configuration reloaded; now in effect: %s", ", ".join(live))
        self.request("configuration reloaded")

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
            self._wanted.set()

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
        self._memory = self._recover_memory()
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
        # main thread between two of its bytecodes, and a handler that sets `_wanted` while that same thread
        # holds the Event's lock (inside the worker's own wait or clear) would wait for itself forever.
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
    if config.consul is not None:
        from bridge.catalog.consul import ConsulSource

        return ConsulSource(config)
    raise ConfigError("catalog_file: the agent needs a catalog source (a consul section, catalog_file or --catalog)")


def run_agent(config: Config, reload: Callable[[], Config] | None = None) -> int:
    return Agent(config, source_for(config), reload).run()
