"""Where snapshots come from. The agent only knows this interface; the file source and the Consul
source both yield the same plain `Snapshot`."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bridge.catalog.file import load_catalog
from bridge.core.model import Snapshot

OnChange = Callable[[str], None]


class CatalogUnavailable(RuntimeError):
    """No complete, trustworthy catalog right now: the agent must change nothing (fail static)."""


class CatalogSource(Protocol):
    def start(self, on_change: OnChange) -> None:
        """Begin watching; call `on_change(reason)` whenever the snapshot may have changed."""

    def snapshot(self) -> Snapshot:
        """The current complete snapshot, or CatalogUnavailable."""

    def health(self) -> dict[str, Any]:
        """Health of the source, for /health and status."""

    def stop(self) -> None: ...


@dataclass(frozen=True)
class FileStamp:
    mtime_ns: int
    size: int
    inode: int


def file_stamp(path: str) -> FileStamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileStamp(st.st_mtime_ns, st.st_size, st.st_ino)


class FileSource:
    """A catalog file, re-read when its stat stamp changes (checked once a second)."""

    interval = 1.0

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen = file_stamp(path)
        self._stop = threading.Event()
        self._error: str | None = None

    def start(self, on_change: OnChange) -> None:
        def watch() -> None:
            while not self._stop.wait(self.interval):
                stamp = file_stamp(self.path)
                if stamp != self._seen:
                    self._seen = stamp
                    on_change("catalog file changed")

        threading.Thread(target=watch, name="catalog-file", daemon=True).start()

    def snapshot(self) -> Snapshot:
        try:
            snap = load_catalog(self.path)
        except ValueError as exc:
            self._error = str(exc)
            raise CatalogUnavailable(str(exc)) from None
        self._error = None
        return snap

    def health(self) -> dict[str, Any]:
        return {"source": "file", "path": self.path, "ok": self._error is None, "error": self._error}

    def stop(self) -> None:
        self._stop.set()
