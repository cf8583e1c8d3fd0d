"""The agent's state file: the memory the kernel cannot give back (drain deadlines, remembered
weights) and the last pass's report, so that a restart keeps its deadlines and `status` can show what
the running agent decided without talking to it."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.dataplane.diff import Memory


@dataclass(frozen=True)
class Stored:
    memory: Memory = field(default_factory=Memory)
    report: dict[str, Any] = field(default_factory=dict)


def load_state(path: str | Path) -> Stored:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return Stored()
    memory = Memory(
        drain_deadlines={str(k): float(v) for k, v in raw.get("drain_deadlines", {}).items()},
        last_weights={str(k): int(v) for k, v in raw.get("last_weights", {}).items()},
    )
    return Stored(memory, dict(raw.get("report", {})))


def save_state(path: str | Path, stored: Stored) -> None:
    """Atomic replace, so a crash mid-write never leaves a state file that loses every deadline."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "drain_deadlines": dict(stored.memory.drain_deadlines),
        "last_weights": dict(stored.memory.last_weights),
        "report": stored.report,
    }
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".state-")
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(payload, sort_keys=True))  # dumps without indent: json's C encoder (dump is Python)
    os.replace(tmp, target)
