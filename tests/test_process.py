"""The real `maglev-bridge run` process on the host (shadow mode, a catalog file: no IPVS needed) under
what neighbours and operators do to it: a bad or missing state file, a read-only or full disk, a second
agent on the same state, signals, and many slow HTTP clients. Nothing here may stop the agent.

The disk cases run the agent in a private mount namespace (`unshare -m`) with its state directory on a
small tmpfs, which the test remounts read-only or fills from inside that namespace (`nsenter`): the
host's file systems are never touched. Needs root, as `make test` runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.consul_agent import free_port
from tests.harness.wait import wait_until

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "bridge.cli"]
WAIT = 60.0
"""Generous: the machine running the tests may be loaded."""


class AgentProcess:
    """One `maglev-bridge run` with its own config, catalog, state directory and log."""

    def __init__(self, tmp: Path, state_dir: Path | None = None, **overrides: Any) -> None:
        self.tmp = tmp
        self.state_dir = state_dir or tmp / "state"
        self.catalog = tmp / "catalog.json"
        if not self.catalog.exists():
            shutil.copy(ROOT / "examples/demo-catalog.json", self.catalog)
        self.port = free_port()
        self.values: dict[str, Any] = {
            "dataplane": "shadow", "vip_cidrs": ["198.51.100.0/24"],
            "tunnel_map": [{"backend": "192.0.2.16/28", "tunnel": "203.0.113.112/28"}],
            "local_address": "192.0.2.11", "catalog_file": str(self.catalog),
            "state_file": str(self.state_dir / "state.json"), "http_bind": f"127.0.0.1:{self.port}",
            "resync_interval": 600, **overrides,
        }
        self.config = tmp / "config.yaml"
        self.write_config()
        self.log = tmp / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, **changes: Any) -> None:
        self.values.update(changes)
        self.config.write_text(json.dumps(self.values))  # JSON is YAML

    def start(self, prefix: tuple[str, ...] = ()) -> AgentProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([*prefix, *CLI, "run", "--config", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def health(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=10) as response:
                body: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        return body

    def wait_ready(self) -> dict[str, Any]:
        result: dict[str, Any] = wait_until(lambda: self.alive() and self.health()["ready"] and self.health(),
                                            timeout=WAIT)
        return result

    def alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the agent exited with {self.proc.returncode}:\n{self.text()}")
        return True

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, needle: str) -> None:
        wait_until(lambda: needle in self.text(), timeout=WAIT)

    def change_catalog(self) -> None:
        """One instance goes critical: a pass with one operation, and a state save."""
        data = json.loads(self.catalog.read_text())
        checks = data["web"][0]["Checks"]
        checks[-1]["Status"] = "critical" if checks[-1]["Status"] == "passing" else "passing"
        self.catalog.write_text(json.dumps(data))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


def run_agent(agents: list[AgentProcess], tmp: Path, **kwargs: Any) -> AgentProcess:
    agent = AgentProcess(tmp, **kwargs)
    agents.append(agent)
    return agent.start()


# -- the state file ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "lost"),
    [
        (lambda p: p.write_text('{"drain_deadlines": {"x": "soon"}, "last_weights": {}}'), "Lost: 1 drain deadlines"),
        (lambda p: p.write_text('{"drain_deadlines": {"x": 17'), "it cannot be decoded"),
        (lambda p: p.mkdir(), "cannot read it: Is a directory"),
    ],
    ids=["wrong-shape", "truncated", "directory"],
)
def test_a_bad_state_file_is_moved_aside_and_the_agent_serves_without_memory(agents, tmp_path, bad, lost):
    state = tmp_path / "state" / "state.json"
    state.parent.mkdir()
    bad(state)
    agent = run_agent(agents, tmp_path)
    health = agent.wait_ready()
    assert lost in health["state_file"]["lost_at_start"] and "starts without memory" in agent.text()
    assert health["state_file"]["saved"] and not health["degraded"]
    assert len(list(state.parent.glob("state.json.bad-*"))) == 1
    # a good state file is written in its place (just after /health turns ready)
    wait_until(lambda: state.is_file() and json.loads(state.read_text())["report"], timeout=WAIT)


def _in_namespace(agent: AgentProcess, *command: str) -> None:
    subprocess.run(["nsenter", "-t", str(agent.pid), "-m", *command], check=True, capture_output=True)


def test_a_read_only_then_full_state_directory_degrades_health_and_recovers(agents, tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    # the agent's own mount namespace, with its state directory on a 256 KiB tmpfs
    setup = f"mount -t tmpfs -o size=256k tmpfs {state_dir} && exec \"$@\""
    agent = AgentProcess(tmp_path, state_dir=state_dir)
    agents.append(agent)
    agent.start(prefix=("unshare", "-m", "--propagation", "private", "sh", "-c", setup, "sh"))
    agent.wait_ready()
    assert agent.health()["state_file"]["saved"]

    _in_namespace(agent, "mount", "-o", "remount,ro", str(state_dir))
    agent.change_catalog()
    health = wait_until(lambda: not agent.health()["state_file"]["saved"] and agent.health(), timeout=WAIT)
    assert "Read-only file system" in health["state_file"]["error"] and health["degraded"]
    agent.wait_log("state file not saved, keeping it in memory and retrying")

    _in_namespace(agent, "mount", "-o", "remount,rw", str(state_dir))
    _in_namespace(agent, "sh", "-c", f"dd if=/dev/zero of={state_dir}/fill bs=4k 2>/dev/null || true")
    agent.change_catalog()
    health = wait_until(lambda: "No space left" in str(agent.health()["state_file"]["error"]) and agent.health(),
                        timeout=WAIT)
    assert agent.alive() and health["ready"]

    _in_namespace(agent, "rm", f"{state_dir}/fill")
    health = wait_until(lambda: agent.health()["state_file"]["saved"] and agent.health(), timeout=WAIT)
    assert not health["degraded"]
    agent.wait_log("state file saved again")


def test_a_second_agent_on_the_same_state_is_refused_naming_the_holder(agents, tmp_path):
    first = run_agent(agents, tmp_path)
    first.wait_ready()
    (tmp_path / "second").mkdir()
    second = AgentProcess(tmp_path / "second", state_dir=tmp_path / "state")
    refused = subprocess.run([*CLI, "run", "--config", str(second.config)], capture_output=True, text=True,
                             cwd=ROOT, timeout=WAIT)
    assert refused.returncode == 2
    assert f"is in use by another maglev-bridge agent (pid {first.pid}" in refused.stderr
    apply = subprocess.run([*CLI, "apply", "--config", str(first.config)], capture_output=True, text=True,
                           cwd=ROOT, timeout=WAIT)
    assert apply.returncode == 2 and f"(pid {first.pid}" in apply.stderr, "apply refuses while an agent runs"
    assert first.alive() and first.health()["ready"]


# -- signals --------------------------------------------------------------------------------------------


def test_sighup_reloads_a_good_configuration_keeps_the_old_one_for_a_bad_one_and_sigusr1_is_ignored(agents,
                                                                                                   tmp_path):
    agent = run_agent(agents, tmp_path)
    agent.wait_ready()
    agent.write_config(drain_timeout=5, http_bind="127.0.0.1:1")
    os.kill(agent.pid, signal.SIGHUP)
    agent.wait_log("SIGHUP: configuration reloaded; now in effect: drain_timeout")
    assert "changed key(s) http_bind need a restart" in agent.text()
    assert agent.health()["ready"], "the endpoint stays where it was"

    agent.write_config(fou_port=0)
    os.kill(agent.pid, signal.SIGHUP)
    agent.wait_log("SIGHUP: the new configuration is not valid, keeping the running one: fou_port: expected")

    os.kill(agent.pid, signal.SIGUSR1)
    agent.wait_log("SIGUSR1 ignored")
    agent.change_catalog()
    wait_until(lambda: agent.health()["passes"] >= 2, timeout=WAIT)
    assert agent.alive()

    agent.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert agent.proc.wait(timeout=WAIT) == 0  # type: ignore[union-attr]


# -- the HTTP endpoint ---------------------------------------------------------------------------------


def test_many_slow_clients_do_not_keep_health_from_answering(agents, tmp_path):
    agent = run_agent(agents, tmp_path)
    agent.wait_ready()
    threads = len(os.listdir(f"/proc/{agent.pid}/task"))
    slow = []
    for i in range(300):
        s = socket.create_connection(("127.0.0.1", agent.port), timeout=WAIT)
        if i % 2:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        slow.append(s)
    started = time.monotonic()
    assert agent.health()["ready"]
    answered = time.monotonic() - started
    during = len(os.listdir(f"/proc/{agent.pid}/task"))
    assert during <= threads + 2, "connections cost no threads (only /status may start its 2 workers)"
    for s in slow[:5]:
        assert s.recv(100) == b"", "the server closes a connection that does not send a whole request"
    for s in slow:
        s.close()
    assert agent.alive()
    print(f"/health answered in {answered * 1000:.0f} ms with 300 slow clients; threads {threads} -> {during}")


def test_a_non_loopback_http_bind_is_warned_about(agents, tmp_path):
    agent = run_agent(agents, tmp_path, http_bind=f"0.0.0.0:{free_port()}")
    agent.wait_log("is not a loopback address: /status shows this director's services")
