"""Real-kernel test bed: network namespaces on a bridge, inside the test VM.

Every test in tests/kernel/ needs IPVS (ip_vs, ip_vs_mh), fou and ipip, so they run inside the VM that
``python -m tests.vm.boot`` boots (see tests/vm/README.md); that script sets MAGLEV_VM=1.  Outside the VM
every test here is skipped with a reason; inside it nothing is skipped (a missing module is a failure).
Tests in this folder get the ``kernel`` marker automatically (mark them ``@pytest.mark.kernel`` anyway).

Addresses (documentation ranges only; nothing leaves the VM: its root namespace has no default route)
----------------------------------------------------------------------------------------------------
    underlay 192.0.2.0/24     director i = 192.0.2.(10+i)  (d1 .11, d2 .12, d3 .13)
                              backend  i = 192.0.2.(20+i)  (b1 .21 ... b6 .26)
    VIPs     198.51.100.0/24  vip(i) = 198.51.100.i   (the seed's VIP is 198.51.100.1 = vip(1))
    clients  203.0.113.0/24   client i = 203.0.113.(10+i)  (c1 .11 ...)
    tunnel   203.0.113.(100+i) = backend i's tunnel address (the real-server address IPVS is given)
    FOU port 5555

Topology (``topology`` fixture)
-------------------------------
``topology(directors=1, backends=2, clients=1)`` (1-3 directors, 1-6 backends, 1-4 clients) builds one L2
segment: a bridge ``br0`` in its own namespace, and per node a namespace holding ``eth0`` (a veth whose
peer, named after the node - ``d1``, ``b2``, ``c1`` - is a port of ``br0``).  All namespace names start
with a per-topology prefix unique to the test (``Topology.prefix``), so nothing collides; everything is
deleted after the test (servers killed, sockets closed, namespaces removed).

* directors / backends: ``lo`` up, underlay address /24 on eth0, a /32 on-link route to every client
  (DSR: backends answer clients directly, replies never pass a director).
* clients: address /24 on eth0, ``192.0.2.0/24`` on-link, and ``198.51.100.0/24 via <director>``:
  ``client.via(director)`` switches it (``ip route replace``).  Built routed via directors[0].
* No IPVS, tunnels, VIPs or sysctls are configured: that is the agent's job, or the seed's below.

Objects
-------
``Netns`` (every node is one; ``topology.bridge`` too), name in ``.name``:
    .run(*argv, check=True, timeout=60, input=None) -> CompletedProcess[str]   ``ip netns exec NAME argv``
        (a failure raises CommandFailed with the command, exit code, stdout and stderr)
    .sh(script)                     ``sh -c script`` in the namespace
    .ip(*args)                      ``ip -n NAME args`` (no exec)
    .ip_batch(["link set lo up", ...])   several ip commands in one process (``ip -n NAME -batch -``)
    .python(code, *args)            the venv's python ``-c code args`` in the namespace
    .popen(*argv, log=None)         a background process in the namespace, killed at teardown
    .sysctl(key) / .sysctl(key, value)   read (int or str) / write
    .ipvsadm(*args) -> str          ``ipvsadm args`` output
    .ipvs_stats(vip, port, proto="tcp") -> IpvsStats(conns, inpkts, outpkts, inbytes, outbytes)
        (the kernel refreshes these every 2 s: poll, e.g. wait_until(lambda: d.ipvs_stats(v, 80).conns == 40))
    .entered()                      context manager: this *thread* is in the namespace (setns), e.g. for
                                    pyroute2 objects or calling the agent's code in-process:
                                        with director.entered(): IPRoute() ... (sockets keep their netns)
    .socket(family, type)           a socket created inside the namespace
``Node(Netns)``: .label ("d1"), .index (1-based), .address (underlay or client address), .unplug() /
    .plug() (bridge port down/up: a dead or isolated node).
``Director(Node)``.  ``Backend(Node)``: .tunnel_address, .serve(port=80, proto="tcp", name=None) -> Server
    (an echo server bound to 0.0.0.0:PORT answering with the backend's name; see below).
``Client(Node)``: .via(director); .connect(vip, port, sports=None, n=None, timeout=30) -> list[Conn];
    .udp(vip, port, sports, timeout=30) -> list[str]  (one datagram from each source port, the answers).
``Conn``: .sport, .backend (who answered on connect), .ask() -> str (send a line, return who answers now;
    raises OSError/TimeoutError if the connection is gone), .alive() -> bool, .close().
``Topology``: .prefix, .bridge, .directors, .backends, .clients, .client (= clients[0]), .nodes,
    .serve(port=80, proto="tcp", backends=None) -> list[Server]  (start several servers in parallel),
    .seed_director(director, vips, port=80, backends=None, scheduler="mh", flags=(), proto="tcp"),
    .seed_backend(backend, vips)  - the hand configuration from the seed post (exact commands in the
    methods; ``flags`` go to ``ipvsadm -A ... -b``), for comparing the agent with the seed or as a baseline.
Module helpers: ``vip(i)``, ``director_address(i)``, ``backend_address(i)``, ``client_address(i)``,
``tunnel_address(i)``, ``spread(conns) -> Counter`` of backends, ``wait_until(predicate, timeout=60)``,
``run(argv)`` (in the VM's root namespace), ``VENV_PYTHON``, ``in_vm()``; import them with
``from .conftest import Topology, spread, vip`` (tests/kernel is a package).

The echo server (``Backend.serve``) is python (no extra packages): TCP - on accept it sends
``<name>\\n``, then answers every line it receives with ``<name>\\n``; UDP - answers every datagram with
``<name>\\n``.  ``name`` defaults to the backend's label (``b1``).

Fixtures
--------
``topology`` (function): the factory above; call it once or more per test.
``netns`` (function): ``netns("tag")`` -> a bare Netns (lo down, nothing else), deleted after the test.
``kernel_vm`` (session, autouse here): skips outside the VM, checks root and the modules inside.

Gotchas: ip_vs_mh hashes only the client *address* unless the service has the ``mh-port`` flag, so one
client's connections all land on one backend without it.  A director only carries established
connections it has never seen (after ``client.via(other)``) with ``net.ipv4.vs.sloppy_tcp=1``.  The VM is
emulated (TCG): a python start in a namespace costs ~1-2 s; start servers with ``topology.serve()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

VENV_PYTHON = sys.executable
HERE = Path(__file__).resolve().parent

UNDERLAY_NET = "192.0.2.0/24"
VIP_NET = "198.51.100.0/24"
CLIENT_NET = "203.0.113.0/24"
FOU_PORT = 5555
MAX_DIRECTORS, MAX_BACKENDS, MAX_CLIENTS = 3, 6, 4
REQUIRED_MODULES = ("ip_vs", "ip_vs_mh", "fou", "ipip", "nf_conntrack", "veth", "bridge")


def in_vm() -> bool:
    return os.environ.get("MAGLEV_VM") == "1"


def vip(i: int = 1) -> str:
    return f"198.51.100.{i}"


def director_address(i: int) -> str:
    return f"192.0.2.{10 + i}"


def backend_address(i: int) -> str:
    return f"192.0.2.{20 + i}"


def client_address(i: int) -> str:
    return f"203.0.113.{10 + i}"


def tunnel_address(i: int) -> str:
    return f"203.0.113.{100 + i}"


# --------------------------------------------------------------------------------------------- plumbing


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


@dataclass(frozen=True)
class IpvsStats:
    conns: int
    inpkts: int
    outpkts: int
    inbytes: int
    outbytes: int


_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def _count(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)", text)
    if not m:
        raise ValueError(f"not an ipvsadm counter: {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


class Netns:
    """One named network namespace (``/run/netns/NAME``)."""

    def __init__(self, name: str, bed: _Bed):
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
        out = self.ipvsadm("-L", "-n", "--stats", "--exact", flag, f"{vip}:{port}")
        for line in out.splitlines():
            fields = line.split()
            if fields and fields[0].upper() == proto.upper():
                c, ip_, op, ib, ob = (_count(f) for f in fields[2:7])
                return IpvsStats(c, ip_, op, ib, ob)
        raise AssertionError(f"no {proto} {vip}:{port} in:\n{out}")

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


class Node(Netns):
    role = "node"

    def __init__(self, name: str, bed: _Bed, label: str, index: int, address: str, bridge: Netns):
        super().__init__(name, bed)
        self.label = label
        self.index = index
        self.address = address
        self._bridge = bridge

    def unplug(self) -> None:
        """Take this node's bridge port down: it neither sends nor receives on the segment."""
        self._bridge.ip("link", "set", self.label, "down")

    def plug(self) -> None:
        self._bridge.ip("link", "set", self.label, "up")


class Director(Node):
    role = "director"


SERVER_CODE = r"""
import socketserver, sys
name, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
reply = (name + "\n").encode()
class TCP(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(reply)
        for _line in self.rfile:
            self.wfile.write(reply)
class UDP(socketserver.BaseRequestHandler):
    def handle(self):
        self.request[1].sendto(reply, self.client_address)
class TS(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 512
    def handle_error(self, request, client_address):
        pass
class US(socketserver.UDPServer):
    allow_reuse_address = True
srv = TS(("0.0.0.0", port), TCP) if proto == "tcp" else US(("0.0.0.0", port), UDP)
print("ready", flush=True)
srv.serve_forever()
"""


@dataclass
class Server:
    backend: Backend
    name: str
    port: int
    proto: str
    proc: subprocess.Popen[bytes]
    log: Path

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"echo server {self.name} on {self.backend.name} not ready after {timeout}s; "
                                     f"log: {self.log.read_text(errors='replace')[-2000:]}")
            line = self.proc.stdout.readline()
            if line.strip() == b"ready":
                return
            if not line:
                raise AssertionError(f"echo server {self.name} on {self.backend.name} exited "
                                     f"({self.proc.wait()}): {self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        _kill(self.proc)


class Backend(Node):
    role = "backend"

    def __init__(self, name: str, bed: _Bed, label: str, index: int, address: str, bridge: Netns):
        super().__init__(name, bed, label, index, address, bridge)
        self.tunnel_address = tunnel_address(index)

    def start_server(self, port: int = 80, proto: str = "tcp", name: str | None = None) -> Server:
        """Start the echo server without waiting for it (see Server.wait_ready, Topology.serve)."""
        assert proto in ("tcp", "udp"), proto
        name = name or self.label
        log = self._bed.tmpdir / f"{self.name}-server-{proto}-{port}.log"
        proc = self.popen(VENV_PYTHON, "-c", SERVER_CODE, name, str(port), proto,
                          stdout=subprocess.PIPE, stderr=log.open("ab"))
        return Server(self, name, port, proto, proc, log)

    def serve(self, port: int = 80, proto: str = "tcp", name: str | None = None) -> Server:
        server = self.start_server(port, proto, name)
        server.wait_ready()
        return server


@dataclass
class Conn:
    """One TCP connection from a client to a VIP."""

    sport: int
    backend: str
    sock: socket.socket = field(repr=False)
    timeout: float = 30.0

    def _line(self) -> str:
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = self.sock.recv(256)
            if not chunk:
                raise ConnectionResetError(f"connection from port {self.sport} closed by the peer")
            buf += chunk
        return buf.decode().strip()

    def ask(self) -> str:
        """Send one line; return the name of the backend that answers (raises if the connection is gone)."""
        self.sock.settimeout(self.timeout)
        self.sock.sendall(b"?\n")
        return self._line()

    def alive(self) -> bool:
        try:
            return bool(self.ask())
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


class Client(Node):
    role = "client"

    def via(self, director: Director) -> None:
        """Route the VIP range to this director (what an ECMP router would do for one flow)."""
        self.ip("route", "replace", VIP_NET, "via", director.address, "dev", "eth0")

    def connect(self, vip: str, port: int = 80, sports: Iterable[int] | None = None, n: int | None = None,
                timeout: float = 30.0) -> list[Conn]:
        """Open TCP connections to vip:port (from the given source ports, or n ephemeral ones) and read
        each one's greeting.  Connections stay open (closed at teardown or by Conn.close())."""
        if sports is None:
            if n is None:
                raise ValueError("give sports or n")
            ports: list[int] = [0] * n
        else:
            ports = list(sports)
        conns: list[Conn] = []
        for sport in ports:
            s = self.socket()
            self._bed.sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.settimeout(timeout)
            s.bind((self.address, sport))
            s.connect((vip, port))
            conns.append(Conn(s.getsockname()[1], "", s, timeout))
        for c in conns:
            c.backend = c._line()
        return conns

    def udp(self, vip: str, port: int, sports: Iterable[int], timeout: float = 30.0) -> list[str]:
        """Send one datagram to vip:port from each source port; return who answered each."""
        answers = []
        for sport in sports:
            s = self.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.settimeout(timeout)
                s.bind((self.address, sport))
                s.sendto(b"?\n", (vip, port))
                data, _ = s.recvfrom(256)
                answers.append(data.decode().strip())
            finally:
                s.close()
        return answers


def spread(conns: Iterable[Conn]) -> Counter[str]:
    return Counter(c.backend for c in conns)


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2,
               what: str = "condition") -> Any:
    """Poll until predicate() is truthy and return its value; fail after timeout seconds. Generous: Python
    runs 9-13x slower under TCG, more on a loaded host, and the deadline only bounds a failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _kill(proc: subprocess.Popen[bytes]) -> None:
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


class _Bed:
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
            _kill(p)
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


# --------------------------------------------------------------------------------------------- topology


class Topology:
    def __init__(self, bed: _Bed, directors: int, backends: int, clients: int):
        if not (1 <= directors <= MAX_DIRECTORS and 1 <= backends <= MAX_BACKENDS and 1 <= clients <= MAX_CLIENTS):
            raise ValueError(f"topology wants 1-{MAX_DIRECTORS} directors, 1-{MAX_BACKENDS} backends, "
                             f"1-{MAX_CLIENTS} clients; got {directors}/{backends}/{clients}")
        self._bed = bed
        self.prefix = f"mb{secrets.token_hex(3)}"
        self.bridge = Netns(f"{self.prefix}-br", bed)
        bed.add_netns(self.bridge.name)
        self.directors = [self._node(Director, f"d{i}", i, director_address(i)) for i in range(1, directors + 1)]
        self.backends = [self._node(Backend, f"b{i}", i, backend_address(i)) for i in range(1, backends + 1)]
        self.clients = [self._node(Client, f"c{i}", i, client_address(i)) for i in range(1, clients + 1)]
        self.client = self.clients[0]
        # (batched: every exec costs ~0.1 s in the emulated VM)
        bridge = ["link set lo up", "link add br0 type bridge stp_state 0 forward_delay 0", "link set br0 up"]
        for node in self.nodes:
            bridge += [f"link add {node.label} type veth peer name eth0 netns {node.name}",
                       f"link set {node.label} master br0 up"]
        self.bridge.ip_batch(bridge)
        for node in self.nodes:
            cmds = ["link set lo up", "link set eth0 up", f"addr add {node.address}/24 dev eth0"]
            if isinstance(node, Client):
                cmds += [f"route add {UNDERLAY_NET} dev eth0 scope link",
                         f"route replace {VIP_NET} via {self.directors[0].address} dev eth0"]
            else:
                cmds += [f"route add {c.address}/32 dev eth0 scope link" for c in self.clients]
            node.ip_batch(cmds)

    def _node(self, cls: Callable[..., Node], label: str, index: int, address: str) -> Any:
        node = cls(f"{self.prefix}-{label}", self._bed, label, index, address, self.bridge)
        self._bed.add_netns(node.name)
        return node

    @property
    def nodes(self) -> list[Node]:
        return [*self.directors, *self.backends, *self.clients]

    def serve(self, port: int = 80, proto: str = "tcp", backends: Iterable[Backend] | None = None) -> list[Server]:
        """Start echo servers on several backends at once (python starts slowly in the VM)."""
        servers = [b.start_server(port, proto) for b in (self.backends if backends is None else backends)]
        for s in servers:
            s.wait_ready()
        return servers

    # The seed's hand configuration (shared/seeds: "Example Load Balancer / Application Server
    # Configuration"), one backend tunnel per backend; `ip link set ... up` is implied in the post.

    def seed_director(self, director: Director, vips: Iterable[str], port: int = 80,
                      backends: Iterable[Backend] | None = None, scheduler: str = "mh",
                      flags: Sequence[str] = (), proto: str = "tcp") -> None:
        """The seed's load balancer commands, run in one shell in the director's namespace (may be called
        again for more VIPs: existing tunnels and the local VIP route are kept)."""
        d = director
        members = list(self.backends if backends is None else backends)
        cmds = []
        for b in members:
            tun = f"lbtun{b.index}"
            cmds.append(f"ip link show {tun} >/dev/null 2>&1 || {{ "
                        f"ip link add name {tun} type ipip remote {b.address} local {d.address} ttl 2 "
                        f"encap fou encap-sport auto encap-dport {FOU_PORT}; "
                        f"ip link set {tun} up; "
                        f"ip route add {b.tunnel_address} dev {tun} scope link; }}")
        cmds.append(f"ip route show table local | grep -q 'local {VIP_NET} ' || "
                    f"ip route add table local local {VIP_NET} dev lo proto kernel")
        flag = {"tcp": "-t", "udp": "-u"}[proto]
        bflags = f" -b {','.join(flags)}" if flags else ""
        for v in vips:
            cmds.append(f"ipvsadm -A {flag} {v}:{port} -s {scheduler}{bflags}")
            cmds += [f"ipvsadm -a {flag} {v}:{port} -r {b.tunnel_address}:{port}" for b in members]
        d.sh("set -ex\n" + "\n".join(cmds))

    def seed_backend(self, backend: Backend, vips: Iterable[str]) -> None:
        """The seed's application server commands (plus the VIPs on lo and the ARP sysctls), in one shell."""
        cmds = [f"ip fou add port {FOU_PORT} ipproto 4",
                "ip link set dev tunl0 up",
                "sysctl -qw net.ipv4.conf.tunl0.rp_filter=0",
                "sysctl -qw net.ipv4.conf.all.rp_filter=0",
                *(f"ip addr add {v}/32 dev lo" for v in vips),
                "sysctl -qw net.ipv4.conf.all.arp_ignore=1",
                "sysctl -qw net.ipv4.conf.all.arp_announce=2"]
        backend.sh("set -ex\n" + "\n".join(cmds))


# --------------------------------------------------------------------------------------------- pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session", autouse=True)
def kernel_vm() -> None:
    if not in_vm():
        pytest.skip("kernel test: runs only inside the test VM "
                    "(.venv/bin/python -m tests.vm.boot -- .venv/bin/pytest -m kernel tests/kernel)")
    if os.geteuid() != 0:
        pytest.fail("kernel tests must run as root (the VM runs them as root)")
    loaded = {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}
    missing = [m for m in REQUIRED_MODULES if m not in loaded]
    if missing:
        pytest.fail(f"kernel modules not loaded: {missing} (tests/vm/boot.py loads them)")


@pytest.fixture
def _bed() -> Iterator[_Bed]:
    bed = _Bed()
    try:
        yield bed
    finally:
        bed.teardown()


@pytest.fixture
def topology(_bed: _Bed) -> Callable[..., Topology]:
    def make(directors: int = 1, backends: int = 2, clients: int = 1) -> Topology:
        return Topology(_bed, directors, backends, clients)

    return make


@pytest.fixture
def netns(_bed: _Bed) -> Callable[[str], Netns]:
    def make(tag: str = "ns") -> Netns:
        ns = Netns(f"mb{secrets.token_hex(3)}-{tag}", _bed)
        _bed.add_netns(ns.name)
        return ns

    return make
