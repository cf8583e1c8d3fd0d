"""Benchmark (issue: Consul): health-change latency and idle CPU of the real agent against a real Consul.

A real Consul agent (tests/harness/consul_agent.py) gets 2,000 tagged services x 5 instances through
`/v1/catalog/register` (a pool of 1,000 nodes, each instance with its own check). The real agent process
(`maglev-bridge -v run`) watches it in shadow mode: this host has no IPVS, so the agent plans against its
model of the kernel (seeded empty, moved by its own operations) and logs every operation it would issue;
the operations of a pass are exactly those the kernel would get. Measured:

(a) health change -> matching operation: one instance's check is flipped to critical (or back) and the
    time is taken from the moment Consul acknowledged the write to the log timestamp of the first pass
    whose operations give that real server the expected weight (`set real server T weight 0 in VS` after
    its add, or the add alone with weight W). Changes are made one at a time. A side blocking query of
    the bench on the same service splits the time into "Consul notifies" and "agent pass + log".
(a2) registration -> operation: a new instance of a tagged service on a node it had no instance on, its
    check already passing, until the pass that adds its real server (no feed names the service: a sweep
    finds it; issue 13's goal); (a3) deregistration -> drain: the same instance removed again, until the
    pass that sets its weight to 0.
(a4) registration as Nomad makes it: the check has no initial status, so Consul starts it critical and the
    critical-check feed names the service at once; timed from the write to the agent's pass for that
    service (nothing to add yet), then, after a pause like a first check interval, from the check passing
    to the pass that adds the real server. Reported apart from (a2), whose figure stays the goal's.
(b) the agent's CPU while nothing changes (utime+stime from /proc/<pid>/stat), as % of one core.
(c) the agent's TCP connections to Consul (its sockets in /proc), sampled through every phase, and what it
    reports in /status (consul.max_connections, default 8, whatever the number of services). Consul runs
    with its default limits (200 connections per client address).

Then the agent's passes are replayed in this process on the same catalog (the first full pass, a full
re-sync, the small pass after one change), timed and cProfiled, and,
when py-spy is found (PATH, or PYSPY=/path/to/py-spy), the real agent is sampled during a few extra
changes. Prints figures, asserts nothing. Goals (issue 13): p99 < 50 ms for health changes, < 500 ms for
registrations; idle CPU < 0.5% of one core; at most 8 connections.

Knobs (environment): BENCH_SERVICES (2000), BENCH_INSTANCES (5), BENCH_CHANGES (200), BENCH_ARRIVALS (40),
BENCH_NOMAD (20, the registrations of (a4)), BENCH_IDLE (1.1 x wait: every watch re-arms once inside the
window, so the figure is the steady state),
BENCH_LATENCY_BUDGET (200 s: phase (a) stops early, saying so), BENCH_WAIT (consul.wait, the agent's default),
BENCH_RESYNC (resync_interval, 3600: no periodic pass during the measurements; its cost is reported),
BENCH_ONLY=registrations (phases (a2), (a3) and (a4) alone, with the connections: no idle window, no health
changes, no replay or py-spy; a few minutes instead of 8-14, for iterating on the sweep).
The load average (1 minute) is sampled through the run and reported: the host is shared, and the sweep that
finds registrations slows with CPU contention.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.core.config import Config, ConsulConfig  # noqa: E402
from tests.harness.consul_agent import ConsulAgent, free_port  # noqa: E402

SERVICES = int(os.environ.get("BENCH_SERVICES", 2000))
INSTANCES = int(os.environ.get("BENCH_INSTANCES", 5))
CHANGES = int(os.environ.get("BENCH_CHANGES", 200))
ARRIVALS = int(os.environ.get("BENCH_ARRIVALS", 40))
NOMAD_ARRIVALS = int(os.environ.get("BENCH_NOMAD", 20))
LATENCY_BUDGET = float(os.environ.get("BENCH_LATENCY_BUDGET", 200))
WAIT = os.environ.get("BENCH_WAIT", ConsulConfig().wait)
IDLE_SECONDS = float(os.environ.get("BENCH_IDLE", 1.1 * ConsulConfig(wait=WAIT).wait_seconds))
DEFAULT_RESYNC = Config().resync_interval
RESYNC = float(os.environ.get("BENCH_RESYNC", 3600))
REGISTRATIONS_ONLY = os.environ.get("BENCH_ONLY", "") == "registrations"
NODES = 1000
CHANGE_TIMEOUT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- the catalog ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    service: str
    sid: str
    node: str
    address: str
    port: int
    weight: int
    vip: str

    @property
    def tunnel(self) -> str:
        return "100.64." + self.address.split(".", 2)[2]


def node_address(n: int) -> str:
    return f"10.20.{n // 250}.{n % 250 + 1}"


def build_instances(services: int = SERVICES, instances: int = INSTANCES) -> list[Instance]:
    out = []
    for v in range(services):
        name = f"svc-{v:04d}"
        vip = f"198.51.{96 + v // 250}.{v % 250 + 1}:80"  # 2,000 distinct VIPs inside 198.51.96.0/20
        for b in range(instances):
            n = (v * 7 + b * 13) % NODES  # distinct nodes within a service
            out.append(Instance(name, f"{name}-{b}", f"node-{n:04d}", node_address(n), 8000 + b, 1 + b % 3, vip))
    return out


def register_body(inst: Instance, status: str) -> dict[str, Any]:
    return {
        "Node": inst.node,
        "Address": inst.address,
        "Service": {"ID": inst.sid, "Service": inst.service, "Address": inst.address, "Port": inst.port,
                    "Tags": [f"maglev.vip={inst.vip}", f"maglev.weight={inst.weight}", "team-x"]},
        "Check": {"Node": inst.node, "CheckID": f"service:{inst.sid}", "Name": f"{inst.service} check",
                  "Status": status, "ServiceID": inst.sid},
    }


class Client:
    """Keep-alive HTTP to Consul, one connection per thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.local = threading.local()

    def request(self, method: str, path: str, body: Any = None,
                timeout: float = 10.0) -> tuple[int, dict[str, str], Any]:
        for attempt in range(2):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            try:
                conn.timeout = timeout
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                conn.request(method, path, body=None if body is None else json.dumps(body))
                resp = conn.getresponse()
                raw = resp.read()
                return resp.status, dict(resp.getheaders()), json.loads(raw) if raw else None
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def register(self, inst: Instance, status: str) -> None:
        code, _, body = self.request("PUT", "/v1/catalog/register", register_body(inst, status))
        if code != 200 or body is not True:
            raise RuntimeError(f"register {inst.sid}: {code} {body}")

    def deregister(self, inst: Instance) -> None:
        code, _, body = self.request("PUT", "/v1/catalog/deregister", {"Node": inst.node, "ServiceID": inst.sid})
        if code != 200 or body is not True:
            raise RuntimeError(f"deregister {inst.sid}: {code} {body}")


def newcomer(inst: Instance) -> Instance:
    """A sixth instance of `inst`'s service, on a node the service has no instance on (13 x 5 is the next
    step of build_instances' node pattern)."""
    n = (int(inst.node.removeprefix("node-")) + (INSTANCES - int(inst.sid.rsplit("-", 1)[1])) * 13) % NODES
    return replace(inst, sid=f"{inst.service}-new", node=f"node-{n:04d}", address=node_address(n),
                   port=8000 + INSTANCES)


# ---- the agent's log -----------------------------------------------------------------------------


@dataclass
class Block:
    """One logged pass: its reason and what it says about the watched real server."""

    reason: str
    header_ts: float
    expected_ops: int
    ops: int = 0
    target_weight: int | None = None
    target_ts: float | None = None
    done_recv: float = 0.0


def log_time(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


class LogReader:
    """Reads the agent's stderr, cutting it into passes; a finished pass goes to `blocks`."""

    def __init__(self, stream: io.TextIOBase) -> None:
        self.stream = stream
        self.blocks: queue.Queue[Block] = queue.Queue()
        self.target: tuple[str, str] | None = None
        self.passes = 0
        self.last_pass_recv = time.time()
        self.tail: list[str] = []
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, name="log-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        block: Block | None = None
        for line in self.stream:
            marker = line.find(" maglev-bridge: ")
            if marker < 0:
                self._keep(line)
                continue
            message = line[marker + 16:].rstrip("\n")
            if block is not None and message.startswith("  ") and not message.startswith("  note:"):
                block.ops += 1
                target = self.target
                if target is not None and target[0] in message and target[1] in message:
                    block.target_weight = int(message.split(" weight ", 1)[1].split(" ", 1)[0])
                    block.target_ts = log_time(line)
                if block.ops >= block.expected_ops:
                    self._finish(block)
                    block = None
                continue
            if ": shadow mode, would run " in message:
                reason, _, rest = message.rpartition(": shadow mode, would run ")
                block = Block(reason, log_time(line), int(rest.split(" ", 1)[0]))
                if block.expected_ops == 0:
                    self._finish(block)
                    block = None
                continue
            if message.endswith(": nothing to change"):
                self._finish(Block(message[: -len(": nothing to change")], log_time(line), 0))
                continue
            if "note:" not in message:
                self._keep(line)

    def _keep(self, line: str) -> None:
        self.tail = [*self.tail[-29:], line.rstrip("\n")]
        if " ERROR " in line or " WARNING " in line:
            self.errors.append(line.rstrip("\n"))

    def _finish(self, block: Block) -> None:
        block.done_recv = time.time()
        self.passes += 1
        self.last_pass_recv = block.done_recv
        self.blocks.put(block)

    def drain(self) -> list[Block]:
        out = []
        while True:
            try:
                out.append(self.blocks.get_nowait())
            except queue.Empty:
                return out


def cpu_split(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime (fields 14, 15)


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def spy(py_spy: str, pid: int, seconds: float, out_file: Path) -> subprocess.Popen[str]:
    """Sample without stopping the process (--nonblocking), so the measurement is not disturbed."""
    return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "20", "--duration",
                             str(int(seconds)), "--output", str(out_file), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish_spy(sampler: subprocess.Popen[str], out_file: Path, limit: float) -> str:
    try:
        sampler.wait(limit)
    except subprocess.TimeoutExpired:
        sampler.terminate()
        sampler.wait(10)
    err = sampler.stderr.read() if sampler.stderr else ""
    return summarize_spy(out_file) if out_file.exists() else f"py-spy gave no samples: {err.strip()[-300:]}"


def consul_connections(pid: int, port: int) -> int:
    """The process's established TCP connections to `port` (its socket inodes matched in /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                count += 1
    return count


class ConnectionSampler:
    """The most connections the agent held to Consul, sampled twice a second from its sockets, and the host's
    load average (1 minute) at the same moments."""

    def __init__(self, pid: int, port: int) -> None:
        self.pid, self.port = pid, port
        self.most = 0
        self.last = 0
        self.loads: list[float] = []
        self.stopped = threading.Event()
        threading.Thread(target=self._run, name="connections", daemon=True).start()

    def _run(self) -> None:
        while not self.stopped.wait(0.5):
            self.loads.append(os.getloadavg()[0])
            try:
                self.last = consul_connections(self.pid, self.port)
            except OSError:
                return
            self.most = max(self.most, self.last)


def agent_status(http_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/status", timeout=10) as resp:
        status: dict[str, Any] = json.loads(resp.read())
    return status


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


# ---- phases --------------------------------------------------------------------------------------


@dataclass
class Change:
    inst: Instance
    kind: str
    write_start: float
    write_done: float
    notified: float | None
    block: Block | None
    passes_seen: int

    @property
    def latency(self) -> float | None:
        if self.block is None or self.block.target_ts is None:
            return None
        return self.block.target_ts - self.write_done

    @property
    def coalesced(self) -> bool:
        return self.block is not None and self.block.reason != f"consul: {self.inst.service} changed"


def make_change(client: Client, reader: LogReader, inst: Instance, kind: str) -> Change:
    """`kind`: a check status to set, "register" or "deregister"; timed to the pass with the expected weight."""
    reader.drain()
    _, headers, _ = client.request("GET", f"/v1/health/service/{inst.service}")
    index = int(headers.get("X-Consul-Index", "0"))
    notified: list[float] = []

    def side_watch() -> None:
        side = Client(client.port)
        side.request("GET", f"/v1/health/service/{inst.service}?index={index}&wait=20s", timeout=25)
        notified.append(time.time())

    watcher = threading.Thread(target=side_watch, daemon=True)
    watcher.start()
    time.sleep(0.01)  # let the side query block before the write
    expected = 0 if kind in ("critical", "deregister") else inst.weight
    # real servers are tunnel addresses on the VIP's port (mh-port); the instance port is not in the op
    reader.target = (f"real server {inst.tunnel}:{inst.vip.rsplit(':', 1)[1]} weight ", f" in {inst.vip}/")
    write_start = time.time()
    if kind == "deregister":
        client.deregister(inst)
    else:
        client.register(inst, "passing" if kind == "register" else kind)
    write_done = time.time()
    deadline = write_done + CHANGE_TIMEOUT
    seen = 0
    found: Block | None = None
    while found is None and time.time() < deadline:
        try:
            block = reader.blocks.get(timeout=0.5)
        except queue.Empty:
            continue
        seen += 1
        if block.target_weight == expected and block.target_ts is not None and block.target_ts >= write_start - 0.002:
            found = block
    watcher.join(5)
    reader.target = None
    return Change(inst, kind, write_start, write_done, notified[0] if notified else None, found, seen)


def time_taken_in(client: Client, reader: LogReader, inst: Instance) -> float | None:
    """Registers `inst` with its check critical, as Consul starts a check registered without a status (as
    Nomad does), and times it to the agent's first pass for its service (nothing to add: it does not serve
    yet); None when no such pass came within CHANGE_TIMEOUT."""
    reader.drain()
    client.register(inst, "critical")
    write_done = time.time()
    deadline = write_done + CHANGE_TIMEOUT
    while time.time() < deadline:
        try:
            block = reader.blocks.get(timeout=0.5)
        except queue.Empty:
            continue
        if inst.service in block.reason and block.header_ts >= write_done - 0.002:
            return block.header_ts - write_done
    return None


def wait_synced(http_port: int, reader: LogReader, proc: subprocess.Popen[str], timeout: float = 400) -> float:
    start = time.time()
    deadline = start + timeout
    ready = False
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("agent exited while syncing:\n" + "\n".join(reader.tail))
        if not ready:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2) as resp:
                    ready = resp.status == 200
            except (OSError, urllib.error.URLError):
                pass
        elif reader.passes and time.time() - reader.last_pass_recv > 8:
            return reader.last_pass_recv - start
        time.sleep(0.2)
    raise SystemExit("agent did not sync in time:\n" + "\n".join(reader.tail))


def replay_passes(config_path: Path, client: Client, tmp: Path) -> tuple[dict[str, float], str]:
    """The agent's passes on the same catalog, in this process (bench/agent_passes.py)."""
    from bench.agent_passes import replay
    from bridge.core.config import load_config

    config = replace(load_config(config_path), state_file=str(tmp / "replay-state.json"))
    names = sorted({f"svc-{v:04d}" for v in range(SERVICES)})
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: client.request("GET", f"/v1/health/service/{n}")[2], names))
    return replay(config, dict(zip(names, answers, strict=True)), profile=True)


def find_py_spy() -> str | None:
    return os.environ.get("PYSPY") or shutil.which("py-spy") or (
        "/tmp/pyspy/bin/py-spy" if Path("/tmp/pyspy/bin/py-spy").exists() else None)


# ---- main ----------------------------------------------------------------------------------------


def main() -> None:
    t_start = time.time()
    build = subprocess.run(["bash", str(ROOT / "scripts/build-hashicorp.sh"), "consul"], check=True,
                           capture_output=True, text=True)
    binary = build.stdout.strip().splitlines()[-1]
    instances = build_instances()
    rows: list[tuple[str, str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="maglev-bench-"))
    with ConsulAgent(binary, log_level="WARN") as consul:  # Consul's default limits
        client = Client(consul.http_port)
        t0 = time.time()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: client.register(i, "passing"), instances))
        reg = time.time() - t0
        print(f"registered {SERVICES} services x {INSTANCES} instances on {NODES} nodes in {reg:.1f} s "
              f"({len(instances) / reg:.0f}/s)", flush=True)

        http_port = free_port()
        config_path = tmp / "agent.yaml"
        config = {
            "role": "director", "dataplane": "shadow", "vip_cidrs": ["198.51.96.0/20"],
            "tunnel_map": [{"backend": "10.20.0.0/16", "tunnel": "100.64.0.0/16"}], "local_address": "192.0.2.1",
            "state_file": str(tmp / "state.json"), "http_bind": f"127.0.0.1:{http_port}",
            "resync_interval": RESYNC, "node_name": "bench-director",
            "consul": {"address": f"http://127.0.0.1:{consul.http_port}", "wait": WAIT, "register": False},
        }
        config_path.write_text(json.dumps(config))  # JSON is YAML
        proc = subprocess.Popen([str(ROOT / ".venv/bin/maglev-bridge"), "-v", "run", "--config", str(config_path)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, bufsize=1)
        reader = LogReader(proc.stderr)  # type: ignore[arg-type]
        sockets = ConnectionSampler(proc.pid, consul.http_port)
        try:
            sync_s = wait_synced(http_port, reader, proc)
            startup_passes = reader.passes
            startup_cpu = cpu_seconds(proc.pid)
            threads = thread_count(proc.pid)
            print(f"agent synced in {sync_s:.1f} s ({startup_passes} passes, {startup_cpu:.1f} CPU s, "
                  f"{threads} threads)", flush=True)
            reader.drain()

            # (b) idle CPU
            idle_seconds = 0.0 if REGISTRATIONS_ONLY else IDLE_SECONDS
            py_spy = None if REGISTRATIONS_ONLY else find_py_spy()
            passes0, split0, w0 = reader.passes, cpu_split(proc.pid), time.time()
            time.sleep(idle_seconds / 2)
            idle_spy = "py-spy not found (pip install py-spy; or PYSPY=/path)"
            if py_spy:  # sample the second half of the idle window
                sampler = spy(py_spy, proc.pid, idle_seconds / 2 - 2, tmp / "py-spy-idle.txt")
            time.sleep(idle_seconds / 2)
            split1, idle_wall = cpu_split(proc.pid), time.time() - w0
            idle_user, idle_sys = split1[0] - split0[0], split1[1] - split0[1]
            idle_cpu = idle_user + idle_sys
            if py_spy:
                idle_spy = finish_spy(sampler, tmp / "py-spy-idle.txt", 30)
            idle_passes = reader.passes - passes0
            idle_pct = 100 * idle_cpu / idle_wall if idle_seconds else float("nan")
            idle_sockets = sockets.last
            if idle_seconds:
                print(f"idle: {idle_pct:.2f}% of one core over {idle_wall:.0f} s ({idle_passes} passes; user "
                      f"{idle_user:.1f} s, system {idle_sys:.1f} s)", flush=True)
            reader.drain()

            # (a) latency, one change at a time: flip a random instance to critical, then back
            rng = random.Random(7)
            changes: list[Change] = []
            cpu_a0, passes_a0, wall_a0 = cpu_seconds(proc.pid), reader.passes, time.time()
            current: Instance | None = None
            for i in range(0 if REGISTRATIONS_ONLY else CHANGES):
                if time.time() - wall_a0 > LATENCY_BUDGET:
                    print(f"latency budget of {LATENCY_BUDGET:.0f} s used up after {i} changes", flush=True)
                    break
                if current is None:
                    current = rng.choice(instances)
                    change = make_change(client, reader, current, "critical")
                else:
                    change = make_change(client, reader, current, "passing")
                    current = None
                changes.append(change)
                if (i + 1) % 20 == 0:
                    done = [c.latency for c in changes if c.latency is not None]
                    print(f"  {i + 1} changes, median so far {1000 * statistics.median(done):.0f} ms"
                          if done else f"  {i + 1} changes, none detected", flush=True)
                time.sleep(rng.uniform(0.2, 0.4))
            if current is not None:
                client.register(current, "passing")
            cpu_a, passes_a = cpu_seconds(proc.pid) - cpu_a0, reader.passes - passes_a0
            wall_a = time.time() - wall_a0

            # (a2, a3) an instance arrives on a new node, then leaves again
            arrivals: list[Change] = []
            departures: list[Change] = []
            for inst in rng.sample(instances, ARRIVALS):
                arrivals.append(make_change(client, reader, newcomer(inst), "register"))
                time.sleep(rng.uniform(0.2, 0.4))
                departures.append(make_change(client, reader, newcomer(inst), "deregister"))
                time.sleep(rng.uniform(0.2, 0.4))
            print(f"  {len(arrivals)} registrations and deregistrations", flush=True)

            # (a4) registrations as Nomad makes them: critical first, then the check passes
            nomad_seen: list[float] = []
            nomad_passing: list[Change] = []
            nomad_rng = random.Random(13)
            for inst in nomad_rng.sample(instances, NOMAD_ARRIVALS):
                arriving = newcomer(inst)
                seen_after = time_taken_in(client, reader, arriving)
                if seen_after is not None:
                    nomad_seen.append(seen_after)
                time.sleep(nomad_rng.uniform(0.5, 1.0))
                nomad_passing.append(make_change(client, reader, arriving, "passing"))
                time.sleep(nomad_rng.uniform(0.2, 0.4))
                make_change(client, reader, arriving, "deregister")
                time.sleep(nomad_rng.uniform(0.2, 0.4))
            print(f"  {len(nomad_passing)} registrations as Nomad makes them", flush=True)

            # where the agent's time goes: py-spy on the real process during a few extra changes
            spy_text = "py-spy not found (pip install py-spy; or PYSPY=/path)"
            if py_spy:
                time.sleep(2)
                sampler = spy(py_spy, proc.pid, 12, tmp / "py-spy.txt")
                extra_rng = random.Random(11)
                spy_end = time.time() + 14
                while sampler.poll() is None and time.time() < spy_end:
                    inst = extra_rng.choice(instances)
                    make_change(client, reader, inst, "critical")
                    make_change(client, reader, inst, "passing")
                spy_text = finish_spy(sampler, tmp / "py-spy.txt", 20)
            reader.drain()
            catalog_state = agent_status(http_port)["agent"]["catalog"]
            connections = {"sampled most": sockets.most, "idle": idle_sockets, "reported": catalog_state["connections"],
                           "sweeps": catalog_state["sweeps"], "reads": catalog_state["reads"],
                           "cached sweeps": catalog_state.get("cached_sweeps", 0)}
        finally:
            sockets.stopped.set()
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

        steps, profile_text = {}, "skipped (BENCH_ONLY=registrations)"
        if not REGISTRATIONS_ONLY:
            steps, profile_text = replay_passes(config_path, client, tmp)
    shutil.rmtree(tmp, ignore_errors=True)

    report(changes, steps, profile_text, spy_text, rows, arrivals=arrivals, departures=departures,
           nomad_seen=nomad_seen, nomad_passing=nomad_passing,
           connections=connections, threads=threads, reg=reg, sync_s=sync_s,
           startup_cpu=startup_cpu, idle_pct=idle_pct, idle_spy=idle_spy,
           idle_user=idle_user, idle_sys=idle_sys, idle_wall=idle_wall, idle_passes=idle_passes,
           cpu_a=cpu_a, passes_a=passes_a, wall_a=wall_a, errors=reader.errors, total=time.time() - t_start,
           loads=sockets.loads)


def summarize_spy(path: Path, top: int = 14) -> str:
    """py-spy raw (collapsed stacks): the functions most often on top of a stack, and inclusive shares."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaf = frames[-1].split(" (")[0] + " (" + frames[-1].split(" (")[-1] if frames else "?"
        own[leaf] = own.get(leaf, 0) + count
        for frame in set(frames):
            name = frame.split(" (")[0]
            if any(k in frame for k in ("bridge/", "consul/", "requests/", "logging/", "json/")):
                incl[name] = incl.get(name, 0) + count
    if not total:
        return "py-spy: no samples"
    lines = [f"py-spy: {total} samples (active threads only), self time:"]
    for name, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * count / total:5.1f}%  {name}")
    lines.append("inclusive (project / consul / requests / logging / json frames):")
    for name, count in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * count / total:5.1f}%  {name}")
    return "\n".join(lines)


def report(changes: list[Change], steps: dict[str, float], profile_text: str, spy_text: str,
           rows: list[tuple[str, str]], **m: Any) -> None:
    lat = [c.latency for c in changes if c.latency is not None]
    arrived = [c.latency for c in m["arrivals"] if c.latency is not None]
    departed = [c.latency for c in m["departures"] if c.latency is not None]
    nomad_added = [c.latency for c in m["nomad_passing"] if c.latency is not None]
    notify = [c.notified - c.write_done for c in changes if c.notified is not None]
    after_notify = [c.block.target_ts - c.notified for c in changes
                    if c.block is not None and c.block.target_ts is not None and c.notified is not None]
    header_to_target = [c.block.target_ts - c.block.header_ts for c in changes
                        if c.block is not None and c.block.target_ts is not None]
    writes = [c.write_done - c.write_start for c in changes]
    missed = sum(1 for c in changes if c.latency is None)
    coalesced = sum(1 for c in changes if c.coalesced)
    extra_passes = sum(1 for c in changes if c.block is not None and c.passes_seen > 1)
    pass_cpu = m["cpu_a"] / m["passes_a"] if m["passes_a"] else float("nan")
    loads = m["loads"] or [float("nan")]
    resync = steps.get("full re-sync (nothing to change)", float("nan")) / 1000

    print("\n--- the agent's passes replayed in this process (median wall time), shadow mode ---")
    for key, value in steps.items():
        print(f"  {key:<36} {value:8.1f} ms")
    print("\n--- cProfile of 30 small passes (by cumulative time) ---")
    print("\n".join(profile_text.strip().splitlines()[:30]))
    print("\n--- real agent sampled while idle (second half of the idle window) ---")
    print(m["idle_spy"])
    print("\n--- real agent sampled during extra changes ---")
    print(spy_text)
    if m["errors"]:
        print(f"\n--- agent warnings/errors ({len(m['errors'])}), first 5 ---")
        print("\n".join(m["errors"][:5]))

    def ms(values: list[float], q: float) -> str:
        return f"{1000 * pct(values, q):.0f} ms" if values else "n/a"

    rows += [
        ("catalog", f"{SERVICES} services x {INSTANCES} instances, {NODES} nodes, consul.wait {WAIT}"),
        ("registration (catalog API)", f"{m['reg']:.1f} s"),
        ("agent initial sync", f"{m['sync_s']:.1f} s, {m['startup_cpu']:.1f} CPU s"),
        ("(a) changes measured", f"{len(changes)} ({missed} not detected within {CHANGE_TIMEOUT:.0f} s)"),
        ("(a) write -> operation p50", ms(lat, 50)),
        ("(a) write -> operation p99", ms(lat, 99) + "   (goal < 50 ms)"),
        ("(a) write -> operation max", ms(lat, 100)),
        ("(a2) registration -> add p50/p99", f"{ms(arrived, 50)} / {ms(arrived, 99)}   (goal p99 < 500 ms; "
                                              f"{len(m['arrivals']) - len(arrived)} of {len(m['arrivals'])} "
                                              f"not detected)"),
        ("(a3) deregistration -> drain p50/p99", f"{ms(departed, 50)} / {ms(departed, 99)}   "
                                                 f"({len(m['departures']) - len(departed)} not detected)"),
        ("(a4) as Nomad: critical -> taken in", f"{ms(m['nomad_seen'], 50)} / {ms(m['nomad_seen'], 99)} p50/p99   "
                                                 f"({len(m['nomad_passing']) - len(m['nomad_seen'])} of "
                                                 f"{len(m['nomad_passing'])} not seen)"),
        ("(a4) then check passing -> add", f"{ms(nomad_added, 50)} / {ms(nomad_added, 99)} p50/p99   "
                                           f"({len(m['nomad_passing']) - len(nomad_added)} not detected)"),
        ("    consul write (PUT) p50", ms(writes, 50)),
        ("    consul notifies p50 / p99", f"{ms(notify, 50)} / {ms(notify, 99)}"),
        ("    notified -> op logged p50/p99", f"{ms(after_notify, 50)} / {ms(after_notify, 99)}"),
        ("    pass header -> op line p50", ms(header_to_target, 50)),
        ("(a) coalesced changes", f"{coalesced} (pass reason not just this service); {extra_passes} needed "
                                  f"more than one pass"),
        ("pass in agent (CPU per pass)", f"{1000 * pass_cpu:.0f} ms CPU over {m['passes_a']} passes "
                                         f"({100 * m['cpu_a'] / max(m['wall_a'], 1e-9):.0f}% of a core during (a))"),
        ("small pass replayed (wall)", f"{steps.get('small pass after one health change', float('nan')):.1f} ms"),
        ("full re-sync replayed (wall)", f"{steps.get('full re-sync (nothing to change)', float('nan')):.0f} ms"),
        ("(b) idle CPU", f"{m['idle_pct']:.2f}% of one core over {m['idle_wall']:.0f} s, {m['idle_passes']} passes, "
                         f"user {m['idle_user']:.1f} s / sys {m['idle_sys']:.1f} s   (goal < 0.5%)"),
        ("(c) connections to Consul", f"{m['connections']['sampled most']} at most (sampled), "
                                      f"{m['connections']['idle']} while idle; reported {m['connections']['reported']}"
                                      f"   (goal <= 8)"),
        ("    sweeps / reads", f"{m['connections']['sweeps']} (and {m['connections']['cached sweeps']} of the "
                             f"agent's cache) / {m['connections']['reads']} over the run"),
        ("agent threads", f"{m['threads']}"),
        ("(b) + periodic full re-sync", f"~{m['idle_pct'] + 100 * resync / DEFAULT_RESYNC:.2f}% with the default "
                                        f"resync_interval {DEFAULT_RESYNC:.0f} s (idle + replayed re-sync / interval;"
                                        f" the bench ran with {RESYNC:.0f} s)"),
        ("load average (1 min)", f"mean {statistics.mean(loads):.1f}, {min(loads):.1f}-{max(loads):.1f} while "
                                 f"the agent ran (sampled twice a second; {os.cpu_count()} cores)"),
        ("bench wall time", f"{m['total']:.0f} s"),
    ]
    print("\n=== consul latency benchmark (real Consul, real agent, shadow mode) ===")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
