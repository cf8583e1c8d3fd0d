"""The agent's state file: the memory the kernel cannot give back (drain deadlines, the remembered
weights of real servers at weight 0) and the last pass's report, so that a restart keeps its deadlines and
`status` can show what the running agent decided without talking to it.

The file is the only thing the agent writes outside the kernel, so nothing about it may stop a director:
a file that does not decode into the expected shape is moved aside (the director starts as one that lost
its memory, which the planner handles: real servers it cannot place get their drain deadline again, and
assumed remembered weights are marked), a failed write is reported and retried, and an exclusive lock
keeps a second agent from overwriting the first one's deadlines.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec

from bridge.core.keys import dest_key_parser
from bridge.core.memory import Memory, parse_draining

V = TypeVar("V")


@dataclass(frozen=True)
class Stored:
    memory: Memory = field(default_factory=Memory)
    report: dict[str, Any] = field(default_factory=dict)


class _StateFile(msgspec.Struct):
    """The file's schema. Unknown keys are allowed (a newer agent may add some); a wrong type is not."""

    drain_deadlines: dict[str, float] = {}
    last_weights: dict[str, Annotated[int, msgspec.Meta(ge=0, le=65535)]] = {}
    report: dict[str, Any] = {}


class StateFileError(ValueError):
    """The state file exists but cannot be used as it is."""


def read_state(path: str | Path) -> Stored:
    """The stored state; an empty one when there is no file yet. StateFileError names what is wrong."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return Stored()
    except OSError as exc:
        raise StateFileError(f"cannot read it: {exc.strerror}") from None
    try:
        raw = msgspec.json.decode(data, type=_StateFile)
    except msgspec.DecodeError as exc:
        what = "is empty" if not data.strip() else f"is not a state file ({exc})"
        raise StateFileError(f"{what} ({len(data)} bytes)") from None
    return Stored(_memory(raw), raw.report)


def _memory(raw: _StateFile) -> Memory:
    """The file's text keys as the typed keys the agent works with (the file's format stays as it was: the
    keys' own text forms). A key that is not one is a file that does not have the expected shape."""
    dest_key = dest_key_parser()
    try:
        return Memory(drain_deadlines={parse_draining(k): v for k, v in raw.drain_deadlines.items()},
                      last_weights={dest_key(k): v for k, v in raw.last_weights.items()})
    except ValueError as exc:
        raise StateFileError(f"has a key that is not one the agent writes: {exc}") from None


def load_state(path: str | Path) -> Stored:
    """For readers that must not change anything (`status`, `explain`): a bad file reads as empty."""
    try:
        return read_state(path)
    except StateFileError:
        return Stored()


def recover_state(path: str | Path) -> tuple[Stored, str | None]:
    """For the agent and `apply`, which will write the file: a bad one is moved aside (kept for a
    human to read) and the state starts empty. The warning says what was lost and where it went."""
    try:
        return read_state(path), None
    except StateFileError as exc:
        problem = str(exc)
    target = Path(path)
    aside = target.with_name(f"{target.name}.bad-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    lost = _what_it_held(target)
    try:
        os.replace(target, aside)
        where = f"moved to {aside}"
    except OSError as exc:
        where = f"could not be moved aside ({exc.strerror}); it will be replaced at the next save"
    return Stored(), (f"state file {target} {problem}; {where}. Lost: {lost}; this director starts without "
                      "memory (drain deadlines restart, remembered weights are assumed)")


def _what_it_held(path: Path) -> str:
    """Counts of what a readable-but-wrong file still shows, as far as it can be decoded at all."""
    try:
        raw = msgspec.json.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        return "whatever it held (it cannot be decoded)"
    if not isinstance(raw, dict):
        return f"a JSON {type(raw).__name__}, not the expected object"
    counts = [f"{len(raw[key])} {key.replace('_', ' ')}" for key in ("drain_deadlines", "last_weights")
              if isinstance(raw.get(key), dict | list)]
    return ", ".join(counts) or "no recognisable drain deadlines or remembered weights"


def save_state(path: str | Path, stored: Stored) -> None:
    """Atomic and durable (`write_durably`). Raises OSError (read-only or full disk, directory gone); the
    caller retries."""
    write_durably(path, msgspec.json.encode({
        "drain_deadlines": _as_text("drain_deadlines", stored.memory.drain_deadlines),
        "last_weights": _as_text("last_weights", stored.memory.last_weights),
        "report": stored.report,
    }, order="sorted"), prefix=".state-")


_written: dict[str, tuple[Mapping[Any, Any], dict[str, Any]]] = {}
"""Per field, the last mapping written and its text-keyed copy."""


def _as_text(name: str, values: Mapping[Any, V]) -> dict[str, V]:
    """`values` keyed by the keys' text, as the file holds them. The agent writes the file after every pass
    that changed something, but most passes leave the remembered weights as they were (`remember` then
    returns the very same object): their keys are not formatted again. Formatting them costs ~0.4 us a key,
    four times what encoding and sorting the file costs (40,000 keys: 21 ms against 5 ms); since only real
    servers at weight 0 are remembered, that is a few keys rather than one per real server."""
    last = _written.get(name)
    if last is not None and last[0] is values:
        return last[1]
    texts = {str(key): value for key, value in values.items()}
    _written[name] = (values, texts)
    return texts


def write_durably(path: str | Path, data: bytes, *, prefix: str) -> None:
    """The agent's files (the state file, the maintenance file): written and fsynced under a temporary name,
    renamed over the old one, and the directory fsynced, so a crash or power loss leaves either the old or
    the new file, never a truncated one, and a file that was renamed into place is still there after it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=prefix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class StateLocked(RuntimeError):
    """Another agent holds the state file."""


class StateLock:
    """An exclusive `flock` on `<state_file>.lock`, held for as long as the agent runs (the kernel drops it
    when the process dies, however it dies, so there is nothing stale to clean up). The file holds the
    holder's pid, for the refusal message. Where the file cannot be created (a read-only directory) the
    directory itself is locked, which excludes a second agent just as well but cannot name its pid."""

    def __init__(self, state_file: str | Path) -> None:
        self.state_file = Path(state_file)
        self.path = self.state_file.with_name(self.state_file.name + ".lock")
        self._fd: int | None = None
        self.note: str | None = None
        """How the lock was taken when not the usual way (for the log)."""

    def acquire(self) -> None:
        with contextlib.suppress(OSError):
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
        fd, on_file = self._open()
        if fd is None:
            self.note = f"state file lock: cannot open {self.path} or its directory; running without the lock"
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._holder() if on_file else "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise StateLocked(
                    f"state_file: {self.state_file} is in use by another maglev-bridge agent (pid {holder}, lock "
                    f"{self.path}); two agents on one state file would overwrite each other's drain deadlines"
                ) from None
            raise
        self._fd = fd
        if on_file:
            try:
                self.path.write_text(f"{os.getpid()}\n")
            except OSError as exc:
                self.note = f"state file lock: held, but the pid could not be written to {self.path}: {exc.strerror}"

    def _open(self) -> tuple[int | None, bool]:
        """Read-only descriptors: flock needs no more, and a held file open for writing would keep the
        directory's file system from being remounted read-only."""
        candidates = ((self.path, os.O_RDONLY | os.O_CREAT), (self.state_file.parent, os.O_RDONLY | os.O_DIRECTORY))
        for path, flags in candidates:
            try:
                fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
            except OSError:
                continue
            if path != self.path:
                self.note = f"state file lock: cannot create {self.path}; locked {path} instead (no pid recorded)"
            return fd, path == self.path
        return None, False

    def _holder(self) -> str:
        try:
            text = self.path.read_text().strip()
        except OSError:
            return "unknown"
        return text if text.isascii() and text.isdigit() else "unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
