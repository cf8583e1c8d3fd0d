"""Drives the agent through its public command line inside the test VM's namespaces: each director and
backend namespace gets a configuration file, all share one catalog file in Consul's format."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bridge.cli.main import main
from tests.catalog_builder import health_entry
from tests.harness.addresses import vip
from tests.harness.netns import VENV_PYTHON, Netns
from tests.harness.topology import Backend, Director, Topology

AGENT = str(Path(VENV_PYTHON).parent / "maglev-bridge")
TUNNEL_MAP = [{"backend": "192.0.2.16/28", "tunnel": "203.0.113.112/28"}]


def tunnel_of(backend: Backend) -> str:
    """The real-server address the agent derives for a backend through TUNNEL_MAP."""
    host = int(backend.address.rsplit(".", 1)[1]) - 16
    return f"203.0.113.{112 + host}"


class AgentHarness:
    def __init__(self, topology: Topology, **config: Any) -> None:
        self.topology = topology
        self.dir = Path(tempfile.mkdtemp(prefix="maglev-agent-"))
        self.catalog_path = self.dir / "catalog.json"
        self.config_overrides = config
        self.entries: dict[tuple[str, str], dict[str, Any]] = {}
        self.write_catalog()

    def config_path(self, node: Netns, role: str) -> Path:
        label = getattr(node, "label", node.name)
        path = self.dir / f"{label}-{role}.yaml"
        config = {
            "role": role,
            "vip_cidrs": ["198.51.100.0/24"],
            "tunnel_map": TUNNEL_MAP,
            "local_address": getattr(node, "address", None),
            "node_name": label,
            "state_file": str(self.dir / f"{label}-{role}-state.json"),
            "http_bind": "127.0.0.1:9119",
            "catalog_file": str(self.catalog_path),
            "drain_timeout": 2,
            "resync_interval": 5,
            **self.config_overrides,
            **self.node_config(node, role),
        }
        path.write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))
        return path

    def node_config(self, node: Netns, role: str) -> dict[str, Any]:
        """Configuration keys of one node's agent on top of the shared ones (none here)."""
        return {}

    # ---- catalog ---------------------------------------------------------------------------------

    def instance(self, service: str, backend: Backend, *, port: int = 80, tags: list[str] | None = None,
                 status: str = "passing", index: int | None = None, weight: int | None = None) -> None:
        tags = list(tags if tags is not None else [f"maglev.vip={vip(1)}:{port}"])
        if weight is not None:
            tags.append(f"maglev.weight={weight}")
        self.entries[(service, backend.label)] = health_entry(
            service, backend.label, backend.address, port, tags, status=status,
            create_index=index if index is not None else 100 + backend.index)
        self.write_catalog()

    def set_status(self, service: str, backend: Backend, status: str) -> None:
        entry = self.entries[(service, backend.label)]
        for check in entry["Checks"]:
            if check["ServiceID"]:
                check["Status"] = status
        self.write_catalog()

    def remove(self, service: str, backend: Backend) -> None:
        del self.entries[(service, backend.label)]
        self.write_catalog()

    def write_catalog(self) -> None:
        services: dict[str, list[dict[str, Any]]] = {}
        for (service, _), entry in sorted(self.entries.items()):
            services.setdefault(service, []).append(entry)
        tmp = self.catalog_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(services))
        tmp.replace(self.catalog_path)

    # ---- the agent's commands --------------------------------------------------------------------

    def cli(self, node: Netns, role: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`maglev-bridge ARGS --config ...` run in-process inside the node's namespace: the same entry point
        and argument parsing as the console script, without paying a Python start under emulation (about
        15 s for the imports alone). `run` is always a real process (see start())."""
        argv = [*args, "--config", str(self.config_path(node, role))]
        out, err = io.StringIO(), io.StringIO()
        with node.entered(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        result = subprocess.CompletedProcess([AGENT, *argv], code, out.getvalue(), err.getvalue())
        if check and code != 0:
            raise AssertionError(f"maglev-bridge {' '.join(argv)} exited {code}:\n{result.stdout}\n{result.stderr}")
        return result

    def apply(self, director: Director, *extra: str, check: bool = True) -> str:
        return self.cli(director, "director", "apply", *extra, check=check).stdout

    def apply_backends(self, backends: list[Backend] | None = None) -> None:
        for b in backends if backends is not None else self.topology.backends:
            self.cli(b, "backend", "apply", "--role", "backend")

    def status(self, director: Director) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.cli(director, "director", "status", "--format", "json").stdout)
        return out

    def start(self, node: Netns, role: str = "director") -> subprocess.Popen[bytes]:
        log = self.dir / f"{getattr(node, 'label', node.name)}-{role}.log"
        proc = node.popen(AGENT, "-v", "run", "--role", role, "--config", str(self.config_path(node, role)), log=log)
        return proc

    def log(self, node: Netns, role: str = "director") -> str:
        path = self.dir / f"{getattr(node, 'label', node.name)}-{role}.log"
        return path.read_text() if path.exists() else ""

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def wait_log(self, node: Netns, text: str, timeout: float = 120, role: str = "director", since: int = 0) -> None:
        """Until `text` appears in the agent's log after its first `since` characters."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(node, role)[since:]:
                return
            time.sleep(0.3)
        raise AssertionError(f"{text!r} not in the agent's log after {timeout}s:\n{self.log(node, role)[-3000:]}")
