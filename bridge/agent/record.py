"""What the agent's passes did: counted, logged and kept for /health, /status and /metrics, with the retry
backoff that failures set. Each pass ends in one of three ways, and each updates the record once: done (the
outcome may still hold failed operations), unavailable (no trustworthy catalog: nothing was changed) or
failed (an exception, caught at the pass boundary)."""

from __future__ import annotations

import logging
import time
from typing import Any

from bridge.core.model import DesiredState, Rejection
from bridge.core.outcome import PassOutcome
from bridge.dataplane.errors import ApplyError
from bridge.inspect.text import rejections_text

log = logging.getLogger("maglev-bridge")
RETRY_SECONDS = 5.0
RETRY_MAX = 300.0


class PassRecord:
    def __init__(self) -> None:
        self.synced = False
        """A pass has completed: /health is ready."""
        self._said_waiting = False
        self.last_error: str | None = None
        self.last_pass_at: float | None = None
        self.last_success_at: float | None = None
        """When the last pass without a failed operation or service completed: what kube-proxy's
        last-sync timestamp means, so an alert on its age also catches passes that run but keep failing."""
        self.last_pass: dict[str, Any] | None = None
        """What the last pass was: full or how many services it was scoped to, its duration, its operations."""
        self.passes = 0
        self.errors = 0
        """Passes that failed with an exception, since start."""
        self._failures = 0
        """Passes in a row that raised or whose operations failed: the retry backoff's exponent."""
        self.last_failure: dict[str, Any] | None = None
        self.rejected: tuple[Rejection, ...] = ()
        """The claims the last pass refused."""
        self.catalog_at: float | None = None
        """When the last complete catalog was read: its age is how stale a fail-static director is."""
        self.desired: DesiredState | None = None
        """The last pass's desired state (its weights are what /metrics compares the kernel's with)."""

    def unavailable(self, reason: str, exc: Exception) -> None:
        self.last_error = f"catalog unavailable: {exc}"
        if self.synced:
            log.warning("%s: catalog unavailable, keeping the kernel as it is: %s", reason, exc)
        elif not self._said_waiting:
            log.info("waiting for a complete catalog before the first pass: %s", exc)
            self._said_waiting = True

    def done(self, reason: str, outcome: PassOutcome, scope: int | None, started: float, now: float) -> bool:
        """Count and log a pass that completed (`scope`: how many virtual services it covered, None: all;
        `started`: its monotonic start). True when the refused claims changed, which the state file keeps."""
        self.desired = outcome.desired or self.desired
        self.synced = True
        self.last_error = None
        self._failures = self._failures + 1 if outcome.failed else 0
        self.last_pass_at = now
        if not outcome.failed and not outcome.failures:
            self.last_success_at = now
        self.passes += 1
        self._log(reason, outcome)
        self.last_pass = {"reason": reason, "scope": "full" if scope is None else f"{scope} virtual service(s)",
                          "milliseconds": round(1000 * (time.monotonic() - started), 1),
                          "operations": len(outcome.steps), "failed": len(outcome.failed),
                          "rejected": len(outcome.rejected)}
        changed = outcome.rejected != self.rejected
        self.rejected = outcome.rejected
        return changed

    def failed(self, reason: str, stage: str, exc: Exception) -> float:
        """Count, show and log a pass that raised; the seconds until it is retried."""
        self.errors += 1
        self._failures += 1
        message = f"{stage}: {exc.__class__.__name__}: {exc}"
        self.last_error = f"pass failed in {message}"
        self.last_failure = {"at": time.time(), "reason": reason, "stage": stage, "error": message}
        delay = self.retry_delay()
        if isinstance(exc, ApplyError | OSError):
            log.error("%s: pass failed in %s, retrying in %.0f s: %s", reason, stage, delay, exc)
        else:
            log.exception("%s: pass failed in %s, retrying in %.0f s", reason, stage, delay)
        return delay

    def retry_delay(self) -> float:
        """One backoff for a pass that raised and one whose operations failed: an operation that fails for
        good (someone's nftables rule holding the agent's set) must not cost a full pass, a full kernel
        read and a failing transaction every 5 s forever."""
        return min(RETRY_SECONDS * 2.0 ** (self._failures - 1), RETRY_MAX)

    def _log(self, reason: str, outcome: PassOutcome) -> None:
        new = set(outcome.rejected) - set(self.rejected)
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
