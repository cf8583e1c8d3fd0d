"""The maintenance file: present = this director is out of rotation (it announces nothing; IPVS, tunnels and
sysctls stay as they are so flows the routers still send keep working).

A file rather than agent memory so that it survives agent restarts and reboots, works when the agent is
stopped or wedged, and can be read by `status` without the agent. Its content is for people (who, when,
why); its presence alone decides, so a file an operator truncated by hand still means maintenance.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bridge.files.store import write_durably


@dataclass(frozen=True)
class Maintenance:
    reason: str
    since: float
    by: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.since)) if self.since else "?"
        return f"on ({self.reason or 'no reason given'}, since {when}, by {self.by or '?'})"

    def as_json(self) -> dict[str, Any]:
        return asdict(self) | {"on": True}


def read_maintenance(path: str | Path) -> Maintenance | None:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Maintenance(f"maintenance file unreadable: {exc.strerror}", 0.0, "")
    try:
        raw = json.loads(text)
        return Maintenance(str(raw.get("reason", "")), float(raw.get("since", 0.0)), str(raw.get("by", "")))
    except (ValueError, AttributeError, TypeError):
        return Maintenance(text.strip()[:200], 0.0, "")


def write_maintenance(path: str | Path, maintenance: Maintenance) -> None:
    """Atomic, so the agent never reads half a file, and durable: maintenance is often for a reboot, and a
    crash right after `maintenance on` must not bring the director back into rotation."""
    write_durably(path, (json.dumps(asdict(maintenance)) + "\n").encode(), prefix=".maintenance-")


def clear_maintenance(path: str | Path) -> bool:
    """True when maintenance was on."""
    try:
        Path(path).unlink()
    except FileNotFoundError:
        return False
    return True


def maintenance_json(maintenance: Maintenance | None) -> dict[str, Any]:
    return maintenance.as_json() if maintenance else {"on": False}
