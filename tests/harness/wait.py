"""The one way tests wait: poll a condition until it holds, with a deadline that only bounds a failure.

Tests never sleep for a state to arrive and never race the machine.  Real Consul, Nomad and Prometheus on a
loaded 2-core machine, and anything inside the emulated VM (Python there runs 9-13x slower), take many times
longer than on an idle machine; a generous deadline costs a passing test nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2,
               what: str = "condition") -> Any:
    """Poll until predicate() is truthy and return its value; fail after `timeout` seconds naming `what` and
    the last value seen.  An exception from predicate() counts as "not yet" (an agent that is still starting
    refuses connections, a virtual service not created yet makes ipvsadm fail): the last one is shown, and
    chained, when the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            last: Any = predicate()
            if last:
                return last
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            error = last if isinstance(last, Exception) else None
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}") from error
        time.sleep(interval)
