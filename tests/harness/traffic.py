"""Long-lived TCP connections through a VIP, each asking every ~100 ms, every answer's time and backend
recorded: the witness of "no connection was harmed" in the failover tests and benchmark.

One process (run it in the client's namespace) drives every connection from one ``selectors`` loop: the
emulated VM is slow, and 60 threads, or 60 processes, would themselves make the gaps they measure.  It uses
only the standard library so that it starts fast there.  Each tick it sends one line on every connection
that has no question outstanding (a connection whose answer is late gets no second question: its gap just
grows) and reads whatever answers arrived.  It can also sample each director's received-packet counter
from ``/proc/PID/net/dev`` of a process in that director's namespace (its BIRD), for the per-director
traffic picture; the samples include BGP and BFD packets (~10 per second), small beside the test traffic.

    python -m tests.harness.traffic --vip 198.51.100.1 --port 80 --source 203.0.113.11 \\
        --sports 40000:40060 --out rec.json [--sample d1=PID ...]

prints ``ready N`` once every connection has its greeting, runs until SIGTERM or SIGINT, then writes the
recording (``Recording``, JSON) to --out and exits 0.  Times are ``time.monotonic()``: the same clock as the
test's own process in the same machine.  ``Recording`` and its analysis are pure functions of that file.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LINE = b"?\n"
CONNECT_ATTEMPTS = 20
STALL = 0.25


@dataclass
class Flow:
    """One connection's record: every answer's time, the backend whenever it changed, how it ended."""

    sport: int
    backend: str = ""
    answers: list[float] = field(default_factory=list)
    backends: list[tuple[float, str]] = field(default_factory=list)
    reset: float | None = None
    error: str = ""
    connect_attempts: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"sport": self.sport, "backend": self.backend, "answers": [round(t, 4) for t in self.answers],
                "backends": self.backends, "reset": self.reset, "error": self.error,
                "connect_attempts": self.connect_attempts}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Flow:
        return cls(d["sport"], d["backend"], d["answers"], [tuple(x) for x in d["backends"]], d["reset"],
                   d["error"], d["connect_attempts"])


@dataclass
class Recording:
    start: float
    ready: float
    """When every connection had its greeting: gaps are measured from here."""
    end: float
    flows: list[Flow]
    samples: dict[str, list[tuple[float, int]]]
    stalls: list[tuple[float, float]]
    """(from, to) of every time the recorder itself did not run for more than STALL seconds: under emulation
    the machine sometimes does not schedule it, and no answer can be read meanwhile."""

    @classmethod
    def load(cls, path: Path) -> Recording:
        d = json.loads(path.read_text())
        return cls(d["start"], d["ready"], d["end"], [Flow.from_json(f) for f in d["flows"]],
                   {k: [tuple(x) for x in v] for k, v in d["samples"].items()}, [tuple(x) for x in d["stalls"]])

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "ready": self.ready, "end": self.end, "flows": [f.to_json() for f in self.flows],
                "samples": self.samples, "stalls": self.stalls}

    def longest_stall(self, since: float | None = None) -> float:
        lo = self.ready if since is None else since
        return max([b - max(a, lo) for a, b in self.stalls if b > lo] + [0.0])

    def resets(self) -> list[Flow]:
        """Connections that were established and then failed (reset, or any other error)."""
        return [f for f in self.flows if f.answers and (f.reset is not None or f.error)]

    def unconnected(self) -> list[Flow]:
        return [f for f in self.flows if not f.answers]

    def changed_backend(self) -> list[Flow]:
        return [f for f in self.flows if len({b for _, b in f.backends}) > 1]

    def gap(self, flow: Flow, since: float | None = None, until: float | None = None) -> float:
        """The longest time this connection went without an answer inside [since, until] (default: from when
        every connection was open to the end), counting from `since` to its first answer and from its last
        answer to `until`: a connection that never answers again has a gap as long as the rest of the window."""
        lo = self.ready if since is None else since
        hi = self.end if until is None else until
        times = [lo, *(t for t in flow.answers if lo < t < hi), hi]
        return max(b - a for a, b in itertools.pairwise(times))

    def gaps(self, since: float | None = None, until: float | None = None) -> list[float]:
        return [self.gap(f, since, until) for f in self.flows]

    def spread(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.flows:
            out[f.backend] = out.get(f.backend, 0) + 1
        return out

    def summary(self, since: float | None = None, until: float | None = None) -> str:
        gaps = sorted(self.gaps(since, until))
        return (f"{len(self.flows)} connections, {sum(len(f.answers) for f in self.flows)} answers, "
                f"{len(self.resets())} reset, {len(self.changed_backend())} changed backend, longest gap "
                f"p50 {percentile(gaps, 50):.3f} s p99 {percentile(gaps, 99):.3f} s max {gaps[-1]:.3f} s; "
                f"the recorder itself stalled up to {self.longest_stall(since):.3f} s")


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not values:
        return 0.0
    k = max(0, min(len(values) - 1, round(p / 100 * len(values) + 0.5) - 1))
    return values[k]


# ------------------------------------------------------------------------------------------ the driver


@dataclass
class _Conn:
    flow: Flow
    sock: socket.socket
    buf: bytes = b""
    waiting: bool = False


def _rx_packets(pid: int, interface: str = "eth0") -> int:
    for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == interface:
            return int(rest.split()[1])
    return 0


def drive(vip: str, port: int, source: str, sports: range, interval: float,
          sample: dict[str, int]) -> Recording:
    sel = selectors.DefaultSelector()

    def connect(flow: Flow) -> _Conn:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((source, flow.sport))
        s.setblocking(False)
        err = s.connect_ex((vip, port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, f"connect from port {flow.sport}: {errno.errorcode.get(err, err)}")
        c = _Conn(flow, s, waiting=True)  # the greeting is the first answer
        sel.register(s, selectors.EVENT_READ, c)
        return c

    conns = [connect(Flow(sport)) for sport in sports]
    stop = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    samples: dict[str, list[tuple[float, int]]] = {label: [] for label in sample}
    start = time.monotonic()
    ready = False
    ready_at = start
    stalls: list[tuple[float, float]] = []
    next_tick = last = start
    while not stop:
        now = time.monotonic()
        if now - max(last, next_tick) > STALL:  # woke up this much later than it asked to
            stalls.append((round(last, 4), round(now, 4)))
        last = now
        if now >= next_tick:
            next_tick = max(next_tick + interval, now)
            if ready:
                for c in conns:
                    if not c.waiting and c.flow.reset is None:
                        try:
                            c.sock.send(LINE)
                            c.waiting = True
                        except OSError as e:
                            _ended(c, sel, now, e)
            if not ready:  # a connection that failed before its greeting is opened again (setup, not harm)
                for i, c in enumerate(conns):
                    if c.flow.reset is not None and not c.flow.answers and c.flow.connect_attempts < CONNECT_ATTEMPTS:
                        c.sock.close()
                        flow = Flow(c.flow.sport, connect_attempts=c.flow.connect_attempts + 1)
                        conns[i] = connect(flow)
            for label, pid in sample.items():
                with contextlib.suppress(OSError):
                    samples[label].append((round(now, 4), _rx_packets(pid)))
        for key, _ in sel.select(max(0.0, next_tick - time.monotonic())):
            _read(key.data, sel, time.monotonic())
        if not ready and all(c.flow.answers or c.flow.connect_attempts >= CONNECT_ATTEMPTS for c in conns):
            ready = True
            ready_at = time.monotonic()
            print(f"ready {len(conns)}", flush=True)
    end = time.monotonic()
    for c in conns:
        c.sock.close()
    return Recording(start, ready_at, end, [c.flow for c in conns], samples, stalls)


def _read(c: _Conn, sel: selectors.BaseSelector, now: float) -> None:
    try:
        data = c.sock.recv(4096)
    except BlockingIOError:
        return
    except OSError as e:
        _ended(c, sel, now, e)
        return
    if not data:
        _ended(c, sel, now, ConnectionResetError("closed by the peer"))
        return
    c.buf += data
    while b"\n" in c.buf:
        line, _, c.buf = c.buf.partition(b"\n")
        name = line.decode(errors="replace").strip()
        c.flow.answers.append(now)
        if not c.flow.backend:
            c.flow.backend = name
        if not c.flow.backends or c.flow.backends[-1][1] != name:
            c.flow.backends.append((round(now, 4), name))
        c.waiting = False


def _ended(c: _Conn, sel: selectors.BaseSelector, now: float, error: OSError) -> None:
    c.flow.reset = round(now, 4)
    c.flow.error = f"{type(error).__name__}: {error}"
    sel.unregister(c.sock)


class Traffic:
    """Runs the driver in a node's namespace (``node.popen``, e.g. a tests.harness.topology.Client) and hands
    back its Recording when stopped."""

    def __init__(self, node: Any, vip: str, port: int, sports: range, out: Path, python: str,
                 sample: dict[str, int] | None = None, interval: float = 0.1):
        argv = [python, "-m", "tests.harness.traffic", "--vip", vip, "--port", str(port), "--source",
                node.address, "--sports", f"{sports.start}:{sports.stop}", "--interval", str(interval),
                "--out", str(out), *(f"--sample={k}={v}" for k, v in (sample or {}).items())]
        self.out = out
        self.log = out.with_suffix(".log")
        self.proc = node.popen(*argv, stdout=subprocess.PIPE, stderr=self.log.open("ab"),
                               cwd=str(Path(__file__).resolve().parents[2]))

    def wait_ready(self, timeout: float = 120) -> None:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"traffic not ready after {timeout}s: {self.log.read_text(errors='replace')}")
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("ready"):
            raise AssertionError(f"traffic failed ({line!r}): {self.log.read_text(errors='replace')}")

    def stop(self, timeout: float = 60) -> Recording:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        if code != 0:
            raise AssertionError(f"traffic exited {code}: {self.log.read_text(errors='replace')}")
        return Recording.load(self.out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vip", required=True)
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--source", required=True, help="the client's address to bind")
    p.add_argument("--sports", required=True, help="FIRST:END source ports (END excluded)")
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sample", action="append", default=[], metavar="LABEL=PID")
    args = p.parse_args(argv)
    first, end = (int(x) for x in args.sports.split(":"))
    sample = {label: int(pid) for label, pid in (s.split("=") for s in args.sample)}
    rec = drive(args.vip, args.port, args.source, range(first, end), args.interval, sample)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec.to_json()))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
