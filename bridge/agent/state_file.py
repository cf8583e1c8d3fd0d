"""The state file as the running agent keeps it: the memory (drain deadlines, remembered weights) lives in
RAM between passes and is written once per pass with the pass's report (bridge/files/store.py is the
format). A write that fails never fails the pass: /health says the file is not saved and why, and the
agent retries until it succeeds."""

from __future__ import annotations

import logging
import threading
from typing import Any

from bridge.core.memory import Memory
from bridge.files.store import Stored, recover_state, save_state

log = logging.getLogger("maglev-bridge")
RETRY_SECONDS = 10.0


class StateFile:
    """The memory in RAM and its file. The worker saves; the shell's timer retries a failed save."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.memory: Memory | None = None
        """None until recovered from the file (at start, or before the first pass)."""
        self.error: str | None = None
        """Why the state file could not be saved, until a save succeeds again."""
        self.lost: str | None = None
        """What was lost when a bad state file was moved aside at start."""
        self._unsaved: Stored | None = None
        self._lock = threading.Lock()

    def recover(self) -> Memory:
        """The file's memory; a bad file is moved aside, said once, and the agent starts without."""
        stored, warning = recover_state(self.path)
        if warning:
            log.warning("%s", warning)
            self.lost = warning
        self.memory = stored.memory
        return stored.memory

    def save(self, report: dict[str, Any]) -> bool:
        """Write the memory with this pass's report; False: not saved, retry with `flush`."""
        with self._lock:
            self._unsaved = Stored(self.memory or Memory(), report)
        return self.flush()

    def flush(self) -> bool:
        """Write the latest unsaved state. A failure (read-only or full disk, directory gone) keeps it in RAM
        and says so once; True when nothing is left unsaved."""
        with self._lock:
            if self._unsaved is None:
                return True
            try:
                save_state(self.path, self._unsaved)
            except OSError as exc:
                error = f"{self.path}: {exc.strerror or exc}"
                if error != self.error:
                    log.warning("state file not saved, keeping it in memory and retrying every %.0f s: %s",
                                RETRY_SECONDS, error)
                self.error = error
                return False
            self._unsaved = None
            if self.error is not None:
                log.info("state file saved again: %s", self.path)
                self.error = None
            return True

    def health(self) -> dict[str, Any]:
        return {"path": self.path, "saved": self.error is None, "error": self.error, "lost_at_start": self.lost}
