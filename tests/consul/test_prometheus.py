"""Prometheus, real, finds two agents through a real Consul with examples/prometheus.yml's consul_sd rules
and scrapes them; every expression of examples/alerts.yml and dashboards/maglev-bridge.json is valid PromQL
(`promtool check rules`) and returns data; the disagreement alert fires when one director holds its real
servers in another order and clears when it is fixed.

Both agents run in shadow mode (this host has no IPVS; tests/kernel/test_metrics_kernel.py checks the IPVS
numbers). Director A reads the catalog from Consul; director B from a file that is Consul's own answer, so
the test can hand B the same catalog with the real servers' CreateIndex (their kernel order) swapped.

Director A's BIRD is a real BIRD on loopback (tests/harness/bird.py) with two BGP sessions: one established
with a second real BIRD, one to a neighbour nobody answers for, so the BGP alert fires for that one only;
with BFD on the established one, which the second BIRD does not answer (one BFD speaker per host), so the
BFD alert fires for it. Director B has no BIRD at its socket, so the unreadable-BIRD alert fires for it."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.files.maintenance import Maintenance, write_maintenance
from tests.consul.helpers import deregister, register
from tests.harness.bird import HostBird, bgp_protocol
from tests.harness.consul_agent import ConsulAgent, free_port
from tests.harness.prometheus import Prometheus
from tests.harness.shadow_agent import Catalog, shadow_agent, web
from tests.harness.wait import wait_until

pytestmark = pytest.mark.consul
ROOT = Path(__file__).resolve().parents[2]
RATE_INTERVAL = "30s"
"""What Grafana's $__rate_interval becomes here (four scrapes at least)."""


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((ROOT / "dashboards" / "maglev-bridge.json").read_text())
    return [target["expr"].replace("$__rate_interval", RATE_INTERVAL)
            for panel in dashboard["panels"] for target in panel.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load((ROOT / "examples" / "alerts.yml").read_text())["groups"]
            for rule in group["rules"]]


def test_the_dashboard_has_a_fixed_uid_and_its_datasource_is_a_variable():
    dashboard = json.loads((ROOT / "dashboards" / "maglev-bridge.json").read_text())
    assert dashboard["uid"] == "maglev-bridge"
    assert [v["type"] for v in dashboard["templating"]["list"]] == ["datasource"]
    assert {json.dumps(p["datasource"]) for p in dashboard["panels"] if "datasource" in p} == {
        json.dumps({"type": "prometheus", "uid": "${datasource}"})}


def test_promtool_accepts_the_alerts_and_every_dashboard_expression(prometheus_binary: str, tmp_path: Path):
    promtool = str(Path(prometheus_binary).parent / "promtool")
    recorded = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"maglev_bridge:dashboard:{n}", "expr": expr} for n, expr in enumerate(dashboard_exprs())]}]}
    (tmp_path / "dashboard.rules.yml").write_text(yaml.safe_dump(recorded))
    for path in (ROOT / "examples" / "alerts.yml", tmp_path / "dashboard.rules.yml"):
        checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_accepts_a_directors_scrape_with_a_drain_in_progress(prometheus_binary: str, tmp_path: Path):
    """The per-real-server families are written by bridge.inspect.metrics, not prometheus_client: Prometheus' own
    checker reads the whole scrape, and finds nothing to lint in it."""
    source = Catalog([web(1), web(2)])
    agent = shadow_agent(tmp_path, source)
    agent.sync("start", full=True)
    source.entries.pop()
    agent.sync("consul: svc-2 changed", full=False)
    scrape = agent.metrics.exposition()
    agent.close_dataplane()
    assert b"maglev_bridge_ipvs_backend_drain_deadline_timestamp_seconds{" in scrape
    promtool = str(Path(prometheus_binary).parent / "promtool")
    checked = subprocess.run([promtool, "check", "metrics"], input=scrape, capture_output=True, timeout=60)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, b"")


def start_agent(tmp_path: Path, consul: ConsulAgent, node: str, catalog_file: Path | None,
                bird_socket: Path) -> tuple[Any, int]:
    port = free_port()
    config = tmp_path / f"{node}.yaml"
    config.write_text(json.dumps({
        "dataplane": "shadow", "node_name": node, "vip_cidrs": ["198.51.100.0/24"], "local_address": "192.0.2.1",
        "tunnel_map": [{"backend": "10.20.0.0/16", "tunnel": "100.64.0.0/16"}], "drain_timeout": 3600,
        "state_file": str(tmp_path / f"{node}.state.json"), "http_bind": f"127.0.0.1:{port}",
        "bgp": {"table": 249, "maintenance_file": str(tmp_path / f"{node}.maintenance"),
                "bird_socket": str(bird_socket)},
        "consul": {"address": f"http://{consul.http_addr}", "wait": "5s", "register": True},
        **({"catalog_file": str(catalog_file)} if catalog_file else {}),
    }))
    log = (tmp_path / f"{node}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", "-v", "run", "--config", str(config)],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    return proc, port


def prometheus_config(consul: ConsulAgent) -> str:
    """examples/prometheus.yml pointed at the test's Consul, scraping every second, alerts without `for`."""
    config = yaml.safe_load((ROOT / "examples" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    (job,) = config["scrape_configs"]
    (sd,) = job["consul_sd_configs"]
    sd.update(server=consul.http_addr, refresh_interval="1s")
    return yaml.safe_dump(config)


def immediate_alerts() -> str:
    rules = yaml.safe_load((ROOT / "examples" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)
    return yaml.safe_dump(rules)


def write_catalog(path: Path, consul: ConsulAgent, swap_order: bool = False) -> None:
    entries = consul.api("/v1/health/service/web")
    if swap_order:
        entries = copy.deepcopy(entries)
        first, last = entries[0]["Service"], entries[-1]["Service"]
        first["CreateIndex"], last["CreateIndex"] = last["CreateIndex"], first["CreateIndex"]
    path.write_text(json.dumps({"web": entries}))


@pytest.fixture
def director_bird() -> Iterator[HostBird]:
    """Director A's BIRD, with BGP sessions `uplink_up` (to a second BIRD, established; BFD on) and
    `uplink_down` (to 127.0.0.3, where nothing listens)."""
    port_a, port_b, port_nobody = free_port(), free_port(), free_port()
    director = ("protocol bfd { multihop { }; }\n"
                + bgp_protocol("uplink_up", "127.0.0.1", port_a, 65001, "127.0.0.2", port_b, 65002, bfd=True)
                + bgp_protocol("uplink_down", "127.0.0.1", port_a, 65001, "127.0.0.3", port_nobody, 65003))
    router = bgp_protocol("director_a", "127.0.0.2", port_b, 65002, "127.0.0.1", port_a, 65001)
    with HostBird("director", "192.0.2.1", director) as bird, HostBird("router", "192.0.2.2", router):
        yield bird


@pytest.fixture
def agents(consul_agent: ConsulAgent, director_bird: HostBird, tmp_path: Path) -> Iterator[Path]:
    for n in (1, 2, 3):
        register(consul_agent, "web", f"b{n}", f"10.20.0.{n}", 80,
                 ["maglev.vip=198.51.100.10:80", "maglev.allow=203.0.113.0/24"])
    catalog_b = tmp_path / "catalog-b.json"
    write_catalog(catalog_b, consul_agent)
    started = [start_agent(tmp_path, consul_agent, "dir-a", None, director_bird.socket),
               start_agent(tmp_path, consul_agent, "dir-b", catalog_b, tmp_path / "no-bird.ctl")]
    try:
        yield catalog_b
    finally:
        for proc, _ in started:
            proc.terminate()
        for proc, _ in started:
            proc.wait(30)
        for node in ("dir-a", "dir-b"):
            assert "Traceback" not in (tmp_path / f"{node}.log").read_text()


def firing(prometheus: Prometheus, name: str) -> list[dict[str, str]]:
    return [a["labels"] for a in prometheus.alerts() if a["labels"]["alertname"] == name and a["state"] == "firing"]


def test_prometheus_finds_the_agents_in_consul_and_alerts_while_directors_disagree(
        consul_agent: ConsulAgent, prometheus_binary: str, agents: Path, tmp_path: Path) -> None:
    rules = {"alerts.yml": immediate_alerts()}
    with Prometheus(prometheus_binary, prometheus_config(consul_agent), rules) as prometheus:
        targets = wait_until(lambda: {(s["metric"]["node"], s["metric"]["role"]) for s in
                                      prometheus.query('up{job="maglev-bridge"} == 1')} == {
            ("dir-a", "director"), ("dir-b", "director")}, timeout=120)
        assert targets
        same = 'count by (fingerprint) (maglev_bridge_virtual_service_info{local_address="198.51.100.10"})'
        wait_until(lambda: [int(s["value"][1]) for s in prometheus.query(same)] == [2], timeout=120)
        assert not firing(prometheus, "MaglevDirectorsDisagree")

        def down(alert: str, *labels: str) -> list[tuple[str, ...]]:
            return sorted(tuple(a[label] for label in labels) for a in firing(prometheus, alert))

        wait_until(lambda: prometheus.query('maglev_bridge_bgp_session_up{node="dir-a",peer="uplink_up"} == 1'),
                   timeout=120)
        wait_until(lambda: down("MaglevBgpSessionDown", "node", "peer") == [("dir-a", "uplink_down")], timeout=120)
        wait_until(lambda: down("MaglevBfdSessionDown", "node", "neighbor") == [("dir-a", "127.0.0.2")], timeout=120)
        wait_until(lambda: down("MaglevBirdUnreadable", "node") == [("dir-b",)], timeout=120)

        write_catalog(agents, consul_agent, swap_order=True)
        alerts = wait_until(lambda: firing(prometheus, "MaglevDirectorsDisagree"), timeout=120)
        assert [(a["local_address"], a["local_port"], a["proto"]) for a in alerts] == [("198.51.100.10", "80", "tcp")]

        write_catalog(agents, consul_agent)
        wait_until(lambda: not firing(prometheus, "MaglevDirectorsDisagree")
                   and [int(s["value"][1]) for s in prometheus.query(same)] == [2], timeout=120)

        # a drain on both directors, so the drain panels have something to show
        deregister(consul_agent, "web", "b3")
        write_catalog(agents, consul_agent)
        wait_until(lambda: len(prometheus.query("maglev_bridge_ipvs_backend_drain_deadline_timestamp_seconds")) == 2,
                   timeout=120)
        assert not firing(prometheus, "MaglevDirectorsDisagree"), "both directors drain the same real server"

        def empty() -> list[str]:
            return [expr for expr in dashboard_exprs() if not prometheus.query(expr)]

        wait_until(lambda: empty() == [], timeout=120)
        assert not firing(prometheus, "MaglevMaintenanceForgotten")
        # dir-a put in maintenance five hours ago and forgotten there
        write_maintenance(tmp_path / "dir-a.maintenance", Maintenance("kernel upgrade", time.time() - 5 * 3600, "ops"))
        forgotten = wait_until(lambda: firing(prometheus, "MaglevMaintenanceForgotten"), timeout=120)
        assert [a["node"] for a in forgotten] == ["dir-a"]
        for rule in alert_rules():
            for name in set(re.findall(r"\b(?:maglev_bridge_\w+|up)\b", rule["expr"])):
                assert prometheus.query(name), f"{rule['alert']}: no series of {name}"
        assert not firing(prometheus, "MaglevFailStatic")
        assert down("MaglevBgpSessionDown", "node", "peer") == [("dir-a", "uplink_down")], \
            "an established session never fires"
