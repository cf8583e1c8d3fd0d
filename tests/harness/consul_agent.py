"""A real Consul agent on loopback, for tests.

``ConsulAgent`` starts ``consul agent`` as a single-node server bound to 127.0.0.1 with
random free ports and its own temporary data dir, and waits until it has elected
itself leader and registered its own node in the catalog.

Two modes:

* ``persistent=False`` (default): ``consul agent -dev``.  Fastest start (about 1 s);
  raft runs in memory, so KV and catalog are empty again after ``restart()``.
* ``persistent=True``: a normal single-node server (``-server -bootstrap-expect=1``)
  with raft on disk in the data dir, tuned like ``-dev`` (raft_multiplier 1, fast
  gossip).  ``restart()`` brings back the same KV and catalog, on the same ports.

* ``join="127.0.0.1:PORT"``: a Consul *client* agent that joins the server whose
  serf LAN address is given (``server_agent.serf_lan_addr``).  ``NomadCluster``
  gives each Nomad client one of these, like a real node has.

Either way ``restart()`` keeps the ports and the data dir, so a client pointed at
``http_addr`` sees the agent go away and come back (fail-static tests).
``stop()`` ends the process; ``close()`` (or leaving the ``with`` block) also removes
the data dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import dns.resolver

if TYPE_CHECKING:
    from tests.harness.nomad_cluster import TLSFiles

LOOPBACK = "127.0.0.1"


# Listening ports for test daemons come from below the kernel's ephemeral range, so no outgoing connection
# (Consul's and Nomad's own, the tests' clients) can take one between the pick and the daemon's bind: the CI
# failure this prevents was Nomad refusing to start because 127.0.0.1:54287, picked with bind(port 0), had
# meanwhile become the source port of somebody's connection. The range also stays clear of Consul's sidecar
# ports (21000-21755) and Nomad's dynamic ports (20000-32000 by default).
PORT_RANGE = range(10000, 20000)
_port_locks: dict[int, int] = {}


def _lock_port(port: int) -> bool:
    """Hold a per-port lock file for this process's life, so concurrent test runs never pick the same port."""
    lock_dir = Path(tempfile.gettempdir()) / "maglev-bridge-ports"
    lock_dir.mkdir(exist_ok=True)
    fd = os.open(lock_dir / str(port), os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _port_locks[port] = fd
    return True


def _bindable(port: int, udp_too: bool) -> bool:
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp_too else (socket.SOCK_STREAM,)
    for kind in kinds:
        try:
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port(udp_too: bool = False, taken: set[int] | None = None) -> int:
    """A loopback port outside the ephemeral range, free for TCP (and UDP if asked), reserved for this run."""
    taken = taken if taken is not None else set()
    for _ in range(500):
        port = random.choice(PORT_RANGE)
        if port in taken or port in _port_locks or not _bindable(port, udp_too):
            continue
        if not _lock_port(port):
            continue
        taken.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {PORT_RANGE.start}-{PORT_RANGE.stop - 1}")


def http_json(url: str, timeout: float = 2.0, method: str = "GET", body: Any = None) -> Any:
    """JSON request/response; ``body`` bytes/str are sent as they are. None on an empty answer."""
    if body is None or isinstance(body, bytes):
        data = body
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def resolver(agent: ConsulAgent) -> dns.resolver.Resolver:
    """A DNS resolver that asks only this agent's DNS interface."""
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = agent.dns_port
    r.lifetime = 15.0  # a loaded machine may answer late; resolving NXDOMAIN still fails at once
    return r


class AgentStartError(RuntimeError):
    pass


class ConsulAgent:
    def __init__(
        self,
        binary: str | os.PathLike[str],
        *,
        persistent: bool = False,
        join: str | None = None,
        datacenter: str = "dc1",
        node_name: str = "maglev-test",
        grpc: bool = False,
        extra_config: dict[str, Any] | None = None,
        start_timeout: float = 120.0,
        log_level: str = "INFO",
        tls: TLSFiles | None = None,
    ) -> None:
        self.binary = str(binary)
        self.persistent = persistent
        self.join = join
        self.datacenter = datacenter
        self.node_name = node_name
        self.start_timeout = start_timeout
        self.base_dir = Path(tempfile.mkdtemp(prefix="maglev-consul-"))
        self.data_dir = self.base_dir / "data"
        self.data_dir.mkdir()
        self.config_file = self.base_dir / "agent.json"
        self.log_file = self.base_dir / "consul.log"
        taken: set[int] = set()
        self.http_port = free_port(taken=taken)
        self.dns_port = free_port(udp_too=True, taken=taken)
        self.serf_lan_port = free_port(udp_too=True, taken=taken)
        self.serf_wan_port = free_port(udp_too=True, taken=taken)
        self.server_port = free_port(taken=taken)
        self.grpc_port = free_port(taken=taken) if grpc else -1
        self.https_port = free_port(taken=taken) if tls else -1
        config: dict[str, Any] = {
            "datacenter": datacenter,
            "node_name": node_name,
            "data_dir": str(self.data_dir),
            "bind_addr": LOOPBACK,
            "client_addr": LOOPBACK,
            "advertise_addr": LOOPBACK,
            "log_level": log_level,
            "disable_update_check": True,
            "disable_anonymous_signature": True,
            "ui_config": {"enabled": False},
            "ports": {
                "http": self.http_port,
                "https": self.https_port,
                "dns": self.dns_port,
                "serf_lan": self.serf_lan_port,
                "serf_wan": self.serf_wan_port,
                "server": self.server_port,
                "grpc": self.grpc_port,
                "grpc_tls": -1,
            },
            # Answer DNS for nodes/services at once, no stale-read surprises in tests.
            "dns_config": {"allow_stale": False},
        }
        if join:
            config.update(
                {
                    "server": False,
                    "retry_join": [join],
                    "retry_interval": "1s",
                    "disable_keyring_file": True,
                    "leave_on_terminate": True,
                    "gossip_lan": {"gossip_interval": "100ms", "probe_interval": "100ms"},
                }
            )
        elif persistent:
            config.update(
                {
                    "server": True,
                    "bootstrap_expect": 1,
                    "performance": {"raft_multiplier": 1},
                    "disable_keyring_file": True,
                    "leave_on_terminate": False,
                    "skip_leave_on_interrupt": True,
                }
            )
        if tls:  # HTTPS beside plain HTTP (which the readiness probe uses), client certificates required
            config["tls"] = {"defaults": {"ca_file": str(tls.ca), "cert_file": str(tls.server_cert),
                                          "key_file": str(tls.server_key), "verify_incoming": True}}
        if extra_config:
            config.update(extra_config)
        self.config_file.write_text(json.dumps(config, indent=2))
        self.proc: subprocess.Popen[bytes] | None = None
        self._t0 = 0.0
        self._terminating = False
        self.startup_seconds: float | None = None

    # -- addresses ---------------------------------------------------------------

    @property
    def http_addr(self) -> str:
        """host:port, the form CONSUL_HTTP_ADDR and Nomad's consul.address take."""
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://{LOOPBACK}:{self.https_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_addr}"

    @property
    def serf_lan_addr(self) -> str:
        """What a client agent's ``join`` takes."""
        return f"{LOOPBACK}:{self.serf_lan_port}"

    @property
    def dns_addr(self) -> tuple[str, int]:
        return (LOOPBACK, self.dns_port)

    def env(self) -> dict[str, str]:
        """Environment for a child that talks to this agent."""
        return {"CONSUL_HTTP_ADDR": self.http_addr}

    # -- lifecycle ---------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [self.binary, "agent", f"-config-file={self.config_file}"]
        if not self.persistent and not self.join:
            cmd.insert(2, "-dev")
        return cmd

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self) -> None:
        """Start the process without waiting (see wait_ready); start() does both."""
        if self.running:
            return
        self._t0 = time.monotonic()
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def start(self) -> Self:
        if self.running:
            return self
        self.launch()
        try:
            self.wait_ready(self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - self._t0
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until there is a leader and this node is in the catalog."""
        deadline = time.monotonic() + timeout
        last_err: object = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AgentStartError(
                    f"consul exited with {self.proc.returncode} while starting; log tail:\n{self.log_tail()}"
                )
            try:
                leader = http_json(f"{self.http_url}/v1/status/leader", timeout=1.0)
                if leader:
                    nodes = http_json(f"{self.http_url}/v1/catalog/nodes", timeout=1.0)
                    if any(n.get("Node") == self.node_name for n in nodes or []):
                        return
                    last_err = "node not yet in catalog"
                else:
                    last_err = "no leader yet"
            except (OSError, urllib.error.URLError, ValueError) as e:
                last_err = e
            time.sleep(0.1)
        raise AgentStartError(f"consul not ready after {timeout}s ({last_err}); log tail:\n{self.log_tail()}")

    def terminate(self) -> None:
        """Send SIGTERM without waiting (a client agent then leaves, ~3 s); stop() waits."""
        if self.proc is not None and self.proc.poll() is None and not self._terminating:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            self._terminating = True

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (graceful: a server does not leave), SIGKILL after ``timeout``."""
        self.terminate()
        proc, self.proc = self.proc, None
        self._terminating = False
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def kill(self) -> None:
        """SIGKILL, like a crash."""
        proc, self.proc = self.proc, None
        self._terminating = False
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def restart(self, down_for: float = 0.0) -> Self:
        """Stop, optionally stay down for ``down_for`` seconds, start on the same ports/data dir."""
        self.stop()
        if down_for:
            time.sleep(down_for)
        return self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- helpers for tests -------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def api(self, path: str, method: str = "GET", body: Any = None) -> Any:
        return http_json(f"{self.http_url}{path}", timeout=30.0, method=method, body=body)

    def register_service(self, service: dict[str, Any]) -> None:
        """PUT /v1/agent/service/register (the agent's own node)."""
        self.api("/v1/agent/service/register", method="PUT", body=service)

    def deregister_service(self, service_id: str) -> None:
        self.api(f"/v1/agent/service/deregister/{service_id}", method="PUT")

    def kv_put(self, key: str, value: str | bytes) -> None:
        self.api(f"/v1/kv/{key}", method="PUT", body=value)

    def kv_get(self, key: str) -> bytes | None:
        """The raw value, or None when the key does not exist."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v1/kv/{key}?raw", timeout=5.0) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def reset(self) -> None:
        """Remove all KV keys and every service registered on this agent except consul."""
        self.api("/v1/kv/?recurse=true", method="DELETE")
        for sid in list(self.api("/v1/agent/services") or {}):
            self.deregister_service(sid)
        for node in self.api("/v1/catalog/nodes") or []:
            if node["Node"] != self.node_name:
                self.api("/v1/catalog/deregister", method="PUT", body={"Node": node["Node"]})

    def __repr__(self) -> str:
        mode = f"client of {self.join}" if self.join else "persistent" if self.persistent else "dev"
        return f"ConsulAgent({mode}, http={self.http_addr}, dns={self.dns_port}, running={self.running})"
