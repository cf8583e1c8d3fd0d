"""`maglev-bridge maintenance on|off|status`: the operator's side of the maintenance file.

`on` writes the file, then deletes this director's announce routes itself: taking a director out of
rotation must work when its agent is stopped, wedged or mid-restart. It then waits (bounded) for the running
agent to finish a pass that saw the file, and deletes again whatever that agent might have announced in
the instant between (a pass that read the file just before it appeared). `off` removes the file; the agent
announces again in its next pass, which the command waits for, if its state is complete.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from bridge.core.config import Config, ConfigError
from bridge.core.ops import Withdraw
from bridge.dataplane.errors import ApplyError
from bridge.dataplane.kernel import open_kernel
from bridge.files.maintenance import Maintenance, clear_maintenance, read_maintenance, write_maintenance

POLL_SECONDS = 0.2


def _agent_health(config: Config) -> dict[str, Any] | None:
    """The running agent's /health body (429 in maintenance and 503 before its first pass still carry it)."""
    try:
        with urllib.request.urlopen(f"http://{config.http_address.netloc}/health", timeout=2) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
            return body
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


def _withdraw_all(config: Config) -> tuple[list[str], list[str]]:
    """(withdrawn VIPs, errors)."""
    assert config.bgp is not None
    with open_kernel(config) as kernel:
        table = config.bgp.table
        results = list(kernel.apply([Withdraw(vip, table) for vip in kernel.read_announced()]))
    withdrawn = [r.op.vip for r in results if r.error is None and isinstance(r.op, Withdraw)]
    return withdrawn, [f"{r.op.describe()}: {r.error}" for r in results if r.error]


def _announced(config: Config) -> list[str]:
    with open_kernel(config) as kernel:
        return list(kernel.read_announced())


def _wait_for_pass(config: Config, passes_before: int, wait: float) -> dict[str, Any] | None:
    """The agent's /health once it has finished a pass begun after the change, or None at the deadline."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        health = _agent_health(config)
        if health is not None and int(health.get("passes", 0)) > passes_before:
            return health
        time.sleep(POLL_SECONDS)
    return None


def _who() -> str:
    try:
        user = os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()}"


def maintenance_command(config: Config, action: str, reason: str, wait: float) -> tuple[list[str], bool]:
    """The lines to print and whether everything worked."""
    if config.bgp is None:
        raise ConfigError("bgp: maintenance needs a bgp section (the announce table and the maintenance file)")
    path = config.bgp.maintenance_file
    if action == "status":
        found = read_maintenance(path)
        announced = _announced(config)
        return [f"maintenance: {found.describe() if found else 'off'}",
                f"announced (table {config.bgp.table}): {', '.join(announced) or 'nothing'}"], True
    before = _agent_health(config)
    lines: list[str] = []
    ok = True
    if action == "on":
        try:
            write_maintenance(path, Maintenance(reason, time.time(), _who()))
        except OSError as exc:
            raise ApplyError(f"bgp.maintenance_file: cannot write {path}: {exc.strerror}") from None
        try:
            withdrawn, errors = _withdraw_all(config)
        except ApplyError as exc:
            withdrawn, errors = [], [str(exc)]
        lines.append(f"maintenance on: withdrew {len(withdrawn)} VIP(s) {' '.join(withdrawn)}".rstrip())
        lines.extend(f"  FAILED {e}" for e in errors)
        ok = not errors
    else:
        lines.append("maintenance off" if clear_maintenance(path) else "maintenance was already off")
    if before is None or wait <= 0:
        lines.append(f"no agent answers on {config.http_bind}: the file decides when it starts "
                     f"(it never announces in maintenance)" if before is None else "not waiting for the agent")
        return lines, ok
    confirmed = _wait_for_pass(config, int(before.get("passes", 0)), wait)
    if confirmed is None:
        lines.append(f"the agent on {config.http_bind} did not finish a pass within {wait:g}s; "
                     f"it will act on the file in its next pass")
        return lines, False
    if action == "on":
        late, errors = _withdraw_all(config)
        lines.extend(f"  withdrew {vip} again (announced by a pass that began before the file)" for vip in late)
        lines.extend(f"  FAILED {e}" for e in errors)
        lines.append("agent confirms maintenance on; it announces nothing until `maglev-bridge maintenance off`")
        return lines, ok and not errors
    announced = _announced(config)
    gate = (confirmed.get("announcing") or {}).get("gate", "")
    lines.append(f"agent confirms maintenance off; announced: {', '.join(announced) or 'nothing'}"
                 + (f" ({gate})" if gate and gate != "open" else ""))
    return lines, ok
