"""A real multi-node Nomad cluster on loopback, for tests.

``NomadCluster`` starts one Nomad server (not a client) and, by default, four Nomad
clients, each a separate ``nomad agent`` process with its own data dir and random
ports, all bound to 127.0.0.1 (``-dev`` is not used).  Every client:

* has ``name``, ``node_class`` and ``meta.rack`` from its :class:`ClientSpec`
  (default: rack-a x2, rack-b, rack-c; two of class ``lb``, two ``app``);
* enables only the ``raw_exec`` driver (``driver.allowlist``) and skips the cloud
  fingerprints, which would otherwise probe 169.254.169.254;
* fingerprints ``lo`` only, so allocations get 127.0.0.1 addresses, and hands out
  dynamic ports from its own disjoint range (the clients share one host);
* gets its own ``cgroup_parent`` so the clients' cpuset partitions do not clobber
  each other (the default ``/nomad`` parent is shared);
* talks to its own Consul *client* agent joined to the given Consul server agent.
  Nomad clients must not share one Consul agent: each one periodically deregisters
  every ``_nomad-task-*`` service on its agent that it does not know about, so
  after the one-minute probation they would delete each other's services.  With one
  Consul agent per Nomad client, services appear on four Consul nodes named like the
  Nomad clients, as in production.

The server registers as ``nomad`` in Consul through the given (server) agent.

``tls=True`` turns on mutual TLS for Nomad's HTTP and RPC with a throwaway CA made by
the ``openssl`` CLI (server cert ``server.global.nomad``, client cert
``client.global.nomad``, a CLI cert for API callers); ``env()``/``ssl_context()`` give
what an API client needs.  Consul stays on plain HTTP.

``stop()`` ends the agents, then every process still running from the cluster's
directory (task executors, logmon, raw_exec tasks, which by design outlive their
Nomad client), unmounts the per-task secrets tmpfs, removes the cgroups and the
directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.harness.consul_agent import LOOPBACK, AgentStartError, ConsulAgent, free_port


@dataclass(frozen=True)
class ClientSpec:
    name: str
    rack: str
    node_class: str


DEFAULT_CLIENTS: tuple[ClientSpec, ...] = (
    ClientSpec("nomad-c1", "rack-a", "lb"),
    ClientSpec("nomad-c2", "rack-a", "app"),
    ClientSpec("nomad-c3", "rack-b", "lb"),
    ClientSpec("nomad-c4", "rack-c", "app"),
)

CLOUD_FINGERPRINTS = "env_aws,env_gce,env_azure,env_digitalocean"


@dataclass
class TLSFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    cli_cert: Path
    cli_key: Path


def make_tls_files(directory: Path, region: str = "global", days: int = 7) -> TLSFiles:
    """A CA and leaf certs for Nomad mTLS, made with the openssl CLI (EC P-256)."""
    directory.mkdir(parents=True, exist_ok=True)
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl CLI not found (apt-get install openssl) - needed for tls=True")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(
        "req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", str(days),
        "-subj", "/CN=maglev-bridge test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip

    def leaf(stem: str, cn: str) -> tuple[Path, Path]:
        ext = directory / f"{stem}.ext"
        ext.write_text(
            f"subjectAltName=DNS:{cn},DNS:localhost,IP:127.0.0.1\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "basicConstraints=critical,CA:FALSE\n"
        )
        run("req", *ec, "-keyout", f"{stem}-key.pem", "-out", f"{stem}.csr", "-subj", f"/CN={cn}")
        run(
            "x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-days", str(days), "-out", f"{stem}.pem", "-extfile", ext.name,
        )  # fmt: skip
        return directory / f"{stem}.pem", directory / f"{stem}-key.pem"

    server_cert, server_key = leaf("server", f"server.{region}.nomad")
    client_cert, client_key = leaf("client", f"client.{region}.nomad")
    cli_cert, cli_key = leaf("cli", f"cli.{region}.nomad")
    return TLSFiles(directory / "ca.pem", server_cert, server_key, client_cert, client_key, cli_cert, cli_key)


class _Agent:
    """One nomad agent process."""

    def __init__(self, name: str, base: Path, config: dict[str, Any]) -> None:
        self.name = name
        self.dir = base / name
        self.dir.mkdir(parents=True)
        self.config_file = self.dir / "agent.json"
        self.log_file = self.dir / "nomad.log"
        self.config = config
        self.config_file.write_text(json.dumps(config, indent=2))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http_port(self) -> int:
        return int(self.config["ports"]["http"])

    def start(self, binary: str) -> None:
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, "agent", f"-config={self.config_file}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
                start_new_session=True,
            )

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def wait(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"[{self.name}] (no log)"
        return "\n".join(f"[{self.name}] {line}" for line in text)


class NomadCluster:
    def __init__(
        self,
        binary: str | os.PathLike[str],
        consul: ConsulAgent,
        *,
        consul_binary: str | os.PathLike[str] | None = None,
        clients: tuple[ClientSpec, ...] | list[ClientSpec] = DEFAULT_CLIENTS,
        tls: bool = False,
        region: str = "global",
        datacenter: str = "dc1",
        dynamic_port_base: int = 21000,
        dynamic_ports_per_client: int = 500,
        start_timeout: float = 180.0,
        log_level: str = "INFO",
    ) -> None:
        self.binary = str(binary)
        self.consul = consul
        self.consul_binary = str(consul_binary or consul.binary)
        self.clients = tuple(clients)
        self.region = region
        self.datacenter = datacenter
        self.start_timeout = start_timeout
        self.base_dir = Path(tempfile.mkdtemp(prefix="maglev-nomad-"))
        # Unique per cluster, so concurrent clusters and leftovers never collide.
        self.cgroup_prefix = f"maglev-{self.base_dir.name.removeprefix('maglev-nomad-')}"
        self.tls: TLSFiles | None = make_tls_files(self.base_dir / "tls", region) if tls else None
        (self.base_dir / "cni").mkdir()  # no CNI plugins; the empty dir keeps the fingerprint quiet
        self.consul_clients: list[ConsulAgent] = []
        taken: set[int] = set()

        def ports() -> dict[str, int]:
            return {
                "http": free_port(taken=taken),
                "rpc": free_port(taken=taken),
                "serf": free_port(udp_too=True, taken=taken),
            }

        server_ports = ports()
        self.server_rpc_addr = f"{LOOPBACK}:{server_ports['rpc']}"
        server_cfg = self._common("nomad-server", server_ports, log_level)
        server_cfg["server"] = {"enabled": True, "bootstrap_expect": 1}
        server_cfg["client"] = {"enabled": False}
        server_cfg["consul"] = {
            "address": consul.http_addr,
            "server_auto_join": False,
            "client_auto_join": False,
            "auto_advertise": True,
        }
        if self.tls:
            server_cfg["tls"] = self._tls_block(self.tls.server_cert, self.tls.server_key)
        self.server = _Agent("nomad-server", self.base_dir, server_cfg)

        self.client_agents: list[_Agent] = []
        for i, spec in enumerate(self.clients):
            cfg = self._common(spec.name, ports(), log_level)
            low = dynamic_port_base + i * dynamic_ports_per_client
            cfg["server"] = {"enabled": False}
            cfg["client"] = {
                "enabled": True,
                "servers": [self.server_rpc_addr],
                "node_class": spec.node_class,
                "meta": {"rack": spec.rack},
                "network_interface": "lo",
                # Must be absolute ("/x"): a relative one disables cpuset management.
                "cgroup_parent": f"/{self.cgroup_prefix}-{spec.name}",
                "cni_path": str(self.base_dir / "cni"),
                "min_dynamic_port": low,
                "max_dynamic_port": low + dynamic_ports_per_client - 1,
                "gc_interval": "10s",
                "options": {
                    "driver.allowlist": "raw_exec",
                    "fingerprint.denylist": CLOUD_FINGERPRINTS,
                },
            }
            cfg["plugin"] = {"raw_exec": {"config": {"enabled": True}}}
            # The consul address is filled in at start(), when that client's Consul agent exists.
            cfg["consul"] = {"server_auto_join": False, "client_auto_join": False, "auto_advertise": True}
            if self.tls:
                cfg["tls"] = self._tls_block(self.tls.client_cert, self.tls.client_key)
            self.client_agents.append(_Agent(spec.name, self.base_dir, cfg))
        self.startup_seconds: float | None = None

    # -- config helpers -----------------------------------------------------------

    def _common(self, name: str, ports: dict[str, int], log_level: str) -> dict[str, Any]:
        return {
            "name": name,
            "region": self.region,
            "datacenter": self.datacenter,
            "data_dir": str(self.base_dir / name / "data"),
            "bind_addr": LOOPBACK,
            "advertise": {
                "http": f"{LOOPBACK}:{ports['http']}",
                "rpc": f"{LOOPBACK}:{ports['rpc']}",
                "serf": f"{LOOPBACK}:{ports['serf']}",
            },
            "ports": ports,
            "log_level": log_level,
            "disable_update_check": True,
            "ui": {"enabled": False},
            "leave_on_terminate": False,
            "leave_on_interrupt": False,
        }

    def _tls_block(self, cert: Path, key: Path) -> dict[str, Any]:
        assert self.tls is not None
        return {
            "http": True,
            "rpc": True,
            "ca_file": str(self.tls.ca),
            "cert_file": str(cert),
            "key_file": str(key),
            "verify_server_hostname": True,
            "verify_https_client": True,
        }

    # -- addresses ------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def http_addr(self) -> str:
        """host:port of the server's HTTP API."""
        return f"{LOOPBACK}:{self.server.http_port}"

    @property
    def api_url(self) -> str:
        """The server's HTTP API, e.g. http://127.0.0.1:PORT (what NOMAD_ADDR takes)."""
        return f"{self.scheme}://{self.http_addr}"

    def client_api_url(self, name: str) -> str:
        agent = next(a for a in self.client_agents if a.name == name)
        return f"{self.scheme}://{LOOPBACK}:{agent.http_port}"

    def env(self) -> dict[str, str]:
        """Environment for the nomad CLI / python-nomad talking to this cluster."""
        env = {"NOMAD_ADDR": self.api_url, "NOMAD_REGION": self.region}
        if self.tls:
            env |= {
                "NOMAD_CACERT": str(self.tls.ca),
                "NOMAD_CLIENT_CERT": str(self.tls.cli_cert),
                "NOMAD_CLIENT_KEY": str(self.tls.cli_key),
                "NOMAD_TLS_SERVER_NAME": f"server.{self.region}.nomad",
            }
        return env

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        ctx.load_cert_chain(str(self.tls.cli_cert), str(self.tls.cli_key))
        return ctx

    def api(self, path: str, method: str = "GET", body: Any = None, base: str | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{base or self.api_url}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=30.0, context=self.ssl_context()) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> Self:
        t0 = time.monotonic()
        try:
            self.server.start(self.binary)
            # One Consul client agent per Nomad client, started while the server elects itself.
            for agent in self.client_agents:
                cc = ConsulAgent(
                    self.consul_binary,
                    join=self.consul.serf_lan_addr,
                    datacenter=self.consul.datacenter,
                    node_name=agent.name,
                )
                self.consul_clients.append(cc)
                cc.launch()
                agent.config["consul"]["address"] = cc.http_addr
                agent.config_file.write_text(json.dumps(agent.config, indent=2))
            for cc in self.consul_clients:
                cc.wait_ready(cc.start_timeout)
            for agent in self.client_agents:
                agent.start(self.binary)
            self.wait_ready(self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _check_alive(self) -> None:
        for agent in (self.server, *self.client_agents):
            rc = agent.exited()
            if rc is not None:
                raise AgentStartError(f"nomad {agent.name} exited with {rc}:\n{agent.log_tail()}")

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.api("/v1/nodes") or [])

    def wait_ready(self, timeout: float) -> None:
        """Until the server has a leader and every client is ready, eligible, raw_exec healthy."""
        deadline = time.monotonic() + timeout
        want = {a.name for a in self.client_agents}
        last: object = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if not self.api("/v1/status/leader"):
                    last = "no leader"
                else:
                    ready = {
                        n["Name"]
                        for n in self.nodes()
                        if n.get("Status") == "ready"
                        and n.get("SchedulingEligibility") == "eligible"
                        and (n.get("Drivers") or {}).get("raw_exec", {}).get("Healthy")
                    }
                    if want <= ready:
                        return
                    last = f"ready: {sorted(ready)}"
            except (OSError, urllib.error.URLError, ValueError) as e:
                last = e
            time.sleep(0.25)
        tails = "\n".join(a.log_tail(15) for a in (self.server, *self.client_agents))
        raise AgentStartError(f"nomad cluster not ready after {timeout}s ({last}):\n{tails}")

    def stop_all_jobs(self, timeout: float = 120.0) -> None:
        """Deregister (purge) every job and wait until no allocation is running."""
        try:
            for job in self.api("/v1/jobs") or []:
                self.api(f"/v1/job/{job['ID']}?purge=true", method="DELETE")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                allocs = self.api("/v1/allocations") or []
                if all(a.get("ClientStatus") not in ("pending", "running") for a in allocs):
                    return
                time.sleep(0.25)
        except (OSError, urllib.error.URLError, ValueError):
            pass  # the server is gone: the leftover sweep in stop() handles the rest

    def stop(self) -> None:
        """Stop everything this cluster started and delete its directory.

        Jobs are purged first so Nomad itself stops the tasks and removes their
        cgroups; whatever survives (a crashed client, a stuck task) is then killed.
        """
        if self.server.exited() is None and self.server.proc is not None:
            self.stop_all_jobs()
        agents = [*self.client_agents, self.server]
        for agent in agents:
            agent.signal(signal.SIGINT)
        for agent in agents:
            if not agent.wait(15):
                agent.signal(signal.SIGKILL)
                agent.wait(5)
        for cc in self.consul_clients:
            cc.terminate()  # all leave at once
        for cc in self.consul_clients:
            cc.close()
        self.consul_clients.clear()
        task_cgroups = self._kill_leftovers()
        self._unmount_leftovers()
        self._remove_cgroups(task_cgroups)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    close = stop

    def _kill_leftovers(self) -> set[Path]:
        """SIGKILL each process whose cwd or command line is inside base_dir (executors, tasks).

        Returns the cgroup v1 dirs those processes were in under a ``nomad`` parent
        (raw_exec puts each task in freezer:/nomad/<random uuid>), for removal.
        """
        base = str(self.base_dir)
        cgroups: set[Path] = set()
        for _ in range(20):
            found = []
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == os.getpid():
                    continue
                try:
                    cwd = os.readlink(entry / "cwd")
                    cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                    if not (cwd.startswith(base) or base in cmdline):
                        continue
                    for line in (entry / "cgroup").read_text().splitlines():
                        _, controllers, path = line.split(":", 2)
                        if path.startswith("/nomad/") and controllers:
                            for ctl in controllers.split(","):
                                cgroups.add(Path("/sys/fs/cgroup", ctl.removeprefix("name="), path[1:]))
                except (OSError, ValueError):
                    continue
                found.append(int(entry.name))
            if not found:
                break
            for pid in found:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        return cgroups

    def _unmount_leftovers(self) -> None:
        """Nomad mounts a tmpfs on each task's secrets/ dir; allocation GC never ran."""
        base = str(self.base_dir)
        try:
            mounts = Path("/proc/self/mounts").read_text().splitlines()
        except OSError:
            return
        points = [m.split()[1].replace("\\040", " ") for m in mounts if len(m.split()) > 1]
        for point in sorted((p for p in points if p.startswith(base + "/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)

    def _remove_cgroups(self, extra: set[Path]) -> None:
        """rmdir (never rm -r: the kernel refuses non-empty cgroups) our client parents and ``extra``."""
        root = Path("/sys/fs/cgroup")
        if not root.is_dir():
            return
        for d in sorted(extra, key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        for hierarchy in [root, *(p for p in root.iterdir() if p.is_dir())]:
            for parent in hierarchy.glob(f"{self.cgroup_prefix}-*"):
                for d in sorted((p for p in parent.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    with contextlib.suppress(OSError):
                        d.rmdir()
                with contextlib.suppress(OSError):
                    parent.rmdir()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"NomadCluster(api={self.api_url}, clients={[c.name for c in self.clients]})"
