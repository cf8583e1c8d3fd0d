"""A real Prometheus on loopback, for tests: started on a configuration file in a temporary directory,
ready when /-/ready answers; `query` and `alerts` read its HTTP API."""

from __future__ import annotations

import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness.consul_agent import LOOPBACK, free_port, http_json
from tests.harness.daemon import Daemon


class Prometheus(Daemon):
    def __init__(self, binary: str, config: str, files: dict[str, str] | None = None) -> None:
        """`files`: written beside the configuration (rule files are named relative to it)."""
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="prometheus-"))
        (self.dir / "prometheus.yml").write_text(config)
        for name, text in (files or {}).items():
            (self.dir / name).write_text(text)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        log = (self.dir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address={LOOPBACK}:{self.port}", "--log.level=warn"],
            cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}: {self.log()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready within {timeout:.0f}s: {self.log()[-3000:]}")

    def log(self) -> str:
        path = self.dir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar as a one-element list) `expr` evaluates to now."""
        answer = http_json(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=10)
        data = answer["data"]
        return data["result"] if data["resultType"] == "vector" else [{"value": data["result"]}]

    def alerts(self) -> list[dict[str, Any]]:
        return list(http_json(f"{self.url}/api/v1/alerts", timeout=10)["data"]["alerts"])
