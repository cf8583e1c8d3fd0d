"""`maglev-bridge run`, a real process, against a real Consul that receives poisoned registrations: it keeps
serving, reports each rejection by service and instance, and applies the next real change. Shadow mode: this
host has no IPVS, and what matters here is that the agent plans it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.consul.helpers import register, set_health
from tests.harness.consul_agent import ConsulAgent, free_port
from tests.harness.wait import wait_until

pytestmark = pytest.mark.consul
ROOT = Path(__file__).resolve().parents[2]


def get(port: int, path: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return dict(json.load(resp))
    except urllib.error.HTTPError as exc:
        return dict(json.load(exc))


def test_run_keeps_serving_through_a_poisoned_registration_and_applies_the_next_change(consul_agent: ConsulAgent,
                                                                                      tmp_path: Path) -> None:
    register(consul_agent, "web", "b1", "10.20.0.1", 80, ["maglev.vip=198.51.100.10:80"])
    port = free_port()
    config = tmp_path / "agent.yaml"
    config.write_text(json.dumps({
        "dataplane": "shadow", "vip_cidrs": ["198.51.100.0/24"], "local_address": "192.0.2.1",
        "tunnel_map": [{"backend": "10.20.0.0/16", "tunnel": "100.64.0.0/16"}],
        "state_file": str(tmp_path / "state.json"), "http_bind": f"127.0.0.1:{port}",
        "consul": {"address": f"http://{consul_agent.http_addr}", "wait": "5s", "register": False},
    }))
    log = tmp_path / "agent.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", "-v", "run", "--config", str(config)],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: get(port, "/health")["ready"], timeout=90)

        register(consul_agent, "evil", "b2", "10.20.0.2", 80, ["maglev.vip=198.51.100.11:80", "maglev.weight=²"])
        register(consul_agent, "evil2", "b3", "10.20.0.3", 80,
                 ["maglev.vip=198.51.100.12:80", "maglev.flags=mh-port,\x1b[2J\x1b]0;pwned\x07"])
        register(consul_agent, "..", "b4", "10.20.0.4", 80, ["maglev.vip=198.51.100.13:80"])  # no URL can name it
        report = wait_until(lambda: {(r["service"], r["instance"]): r for r in
                                     get(port, "/status")["last_pass"].get("rejected", [])}.keys()
                            == {("evil", "evil-b2"), ("evil2", "evil2-b3"), ("..", "*")} and get(port, "/status"),
                            timeout=90)
        reasons = {r["service"]: r["reason"] for r in report["last_pass"]["rejected"]}
        assert "weight '²' is not an integer from 0 to 65535" in reasons["evil"]
        assert "unknown flag(s) '\\x1b[2J\\x1b]0;pwned\\x07'" in reasons["evil2"]
        health = get(port, "/health")
        assert "Consul cannot be asked for this service's health by name" in reasons[".."]
        assert health["ready"] and health["last_pass"]["rejected"] == 3 and health["errors"]["passes_failed"] == 0
        assert health["catalog"]["ok"], "one unreadable service does not make the catalog unavailable"

        set_health(consul_agent, "web", "b1", "10.20.0.1", "critical")
        wait_until(lambda: "set real server 100.64.0.1:80 weight 0 in 198.51.100.10:80/tcp" in log.read_text(),
                   timeout=90)
        assert proc.poll() is None, "the agent is still running"
        assert get(port, "/health")["ready"]
        text = log.read_text()
        assert "REJECTED service evil instance evil-b2 tag 'maglev.weight=²'" in text
        assert "\x1b" not in text, "no raw control character reaches the log"
        assert "Traceback" not in text
    finally:
        proc.terminate()
        proc.wait(30)
