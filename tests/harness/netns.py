"""Named network namespaces inside the test VM, and the record of what one test created so that it is all
removed afterwards (processes killed, sockets closed, namespaces deleted), even when the test fails."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.harness.ipvs import IpvsStats, parse_stats

VENV_PYTHON = sys.executable


def in_vm() -> bool:
    """Inside the test VM (tests/vm/boot.py exports MAGLEV_VM=1), where IPVS, fou and ipip exist."""
    return os.environ.get("MAGLEV_VM") == "1"


class CommandFailed(AssertionError):
    def __init__(self, argv: Sequence[str], proc: subprocess.CompletedProcess[str]):
        self.argv = list(argv)
        self.proc = proc
        super().__init__(f"command failed (exit {proc.returncode}): {' '.join(argv)}\n"
                         f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}")


def run(argv: Sequence[str], check: bool = True, timeout: float = 60,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL, check=False)
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc)
    return proc


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def kill(proc: subprocess.Popen[bytes]) -> None:
    """End a process started in its own session, and everything it started: TERM, then KILL."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


class Bed:
    """What one test created; torn down in reverse."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.sockets: list[socket.socket] = []
        self.tmpdir = Path(tempfile.mkdtemp(prefix="maglev-bed-"))

    def add_netns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)

    def teardown(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()
        for p in reversed(self.procs):
            kill(p)
            for stream in (p.stdout, p.stderr):
                if stream is not None:
                    stream.close()
        errors = []
        for name in reversed(self.namespaces):
            proc = run(["ip", "netns", "del", name], check=False)
            if proc.returncode != 0:
                errors.append(f"{name}: {proc.stderr.strip()}")
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        if errors:
            raise AssertionError(f"netns cleanup failed: {errors}")


class Netns:
    """One named network namespace (``/run/netns/NAME``)."""

    def __init__(self, name: str, bed: Bed):
        self.name = name
        self._bed = bed

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"

    def run(self, *argv: str, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.name, *argv], check=check, timeout=timeout, input=input)

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "-n", self.name, *args], check=check)

    def ip_batch(self, commands: Iterable[str]) -> None:
        """Several ``ip`` commands (one per string, without the leading ``ip``) in one process."""
        script = "\n".join(commands) + "\n"
        run(["ip", "-n", self.name, "-batch", "-"], input=script)

    def python(self, code: str, *args: str, check: bool = True,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run(VENV_PYTHON, "-c", code, *args, check=check, timeout=timeout)

    def popen(self, *argv: str, log: Path | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start argv in the namespace in the background (own session); killed at teardown.  Output goes to
        `log` (default: a file in the bed's temp folder) unless stdout/stderr are given."""
        if log is None:
            log = self._bed.tmpdir / f"{self.name}-{len(self._bed.procs)}.log"
        if "stdout" not in kwargs or "stderr" not in kwargs:
            out = log.open("ab")
            kwargs.setdefault("stdout", out)
            kwargs.setdefault("stderr", out)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[bytes] = subprocess.Popen(["ip", "netns", "exec", self.name, *argv],
                                                         start_new_session=True, **kwargs)
        self._bed.procs.append(proc)
        return proc

    def sysctl(self, key: str, value: int | str | None = None) -> int | str:
        if value is None:
            out = self.run("sysctl", "-n", key).stdout.strip()
            return int(out) if re.fullmatch(r"-?\d+", out) else out
        self.run("sysctl", "-qw", f"{key}={value}")
        return value

    def ipvsadm(self, *args: str) -> str:
        return self.run("ipvsadm", *args).stdout

    def ipvs_stats(self, vip: str, port: int, proto: str = "tcp") -> IpvsStats:
        """Counters of one virtual service (``ipvsadm -Ln --stats --exact``).  The kernel folds its per-CPU
        counters into these every 2 s (the rate estimator), so they lag: poll with wait_until()."""
        flag = {"tcp": "-t", "udp": "-u"}[proto]
        return parse_stats(self.ipvsadm("-L", "-n", "--stats", "--exact", flag, f"{vip}:{port}"), vip, port, proto)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the body with the calling thread inside this namespace."""
        with open("/proc/thread-self/ns/net", "rb") as home, open(f"/run/netns/{self.name}", "rb") as there:
            _setns(there.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        with self.entered():
            return socket.socket(family, type)
