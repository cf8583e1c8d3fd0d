"""When the agent makes a pass: requests for a pass merge into one, so passes never overlap and no request is
lost, however many arrive while a pass runs.

The rules (tests/test_trigger.py is their specification):
- the first pass is full (it must read everything the agent owns);
- a full request beats scoped ones: anything merged with a full request is a full pass;
- the reasons are kept in the order they came, each once, so the log says why a pass ran;
- a request that arrives during a pass wakes the worker once more after it, whatever the count;
- a pass that could not run (no catalog yet, or it failed) carries its request over to the next one, in
  front, and a full request stays full.

A scoped request names no services: what a scoped pass covers is what the director's desired state says
changed since the last applied pass (`DirectorReconciler.pending`), which unions the scopes of every
request merged into it by construction.
"""

from __future__ import annotations

import threading
from typing import NamedTuple


class Request(NamedTuple):
    """One pass to make: why (the merged reasons) and whether it reads and plans everything."""

    reason: str
    full: bool


class Trigger:
    """Merges requests for the one reconcile worker. Any thread may ask; only the worker takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reasons: list[str] = []
        self._full = True
        self._wanted = threading.Event()

    def request(self, reason: str, full: bool = True) -> None:
        """Ask for a pass. Catalog changes ask for a scoped one (`full=False`): only the virtual services
        whose desired value changed are read and planned. Anything else asks for a full one."""
        with self._lock:
            self._reasons.append(reason)
            self._full = self._full or full
        self._wanted.set()

    def take(self) -> Request:
        """Everything asked for since the last take, as one request (the worker's, before a pass)."""
        with self._lock:
            reasons, self._reasons = self._reasons, []
            full, self._full = self._full, False
        return Request(", ".join(dict.fromkeys(reasons)) or "request", full)

    def carry_over(self, request: Request) -> None:
        """A pass that could not run leaves its request pending for the next one, which the next catalog
        change (or timer) brings: a full pass asked for at start must not shrink to a small one."""
        with self._lock:
            self._reasons.insert(0, request.reason)
            self._full = self._full or request.full

    def want_full(self) -> None:
        """The next pass, whatever asks for it, reads everything (the kernel was closed, or a pass failed
        and may have applied part of its operations)."""
        with self._lock:
            self._full = True

    def wake(self) -> None:
        """Wake the worker without asking for a pass (to stop, or to reload the configuration)."""
        self._wanted.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a request or a wake-up, then clear it: requests that came meanwhile are one wake-up.
        False: `timeout` passed without one."""
        woken = self._wanted.wait(timeout)
        self._wanted.clear()
        return woken
