"""The jobs commands, the agent's system job and the keeper against a real Nomad cluster (1 server, 4 raw_exec
clients: rack-a x2, rack-b, rack-c; classes lb, app, lb, app) with a Consul client agent per Nomad client.

Each test cleans up the jobs it registered; the cluster is the session's.
"""

from __future__ import annotations

import re
import signal
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.cli.main import main
from bridge.core.config import parse_config
from bridge.nomad.keeper import keep_jobs
from tests.harness.consul_agent import ConsulAgent, resolver
from tests.harness.nomad_cluster import NomadCluster
from tests.harness.wait import wait_until

pytestmark = pytest.mark.nomad
REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"
RACKS = {"nomad-c1": "rack-a", "nomad-c2": "rack-a", "nomad-c3": "rack-b", "nomad-c4": "rack-c"}


def write_spec(directory: Path, name: str, count: int, **extra: Any) -> None:
    spec = {
        "name": name,
        "driver": "raw_exec",
        "command": "/usr/bin/python3 -m http.server ${NOMAD_PORT_http} --bind ${NOMAD_IP_http}",
        "count": count,
        "cpu": 50,
        "memory": 48,
        "ports": {"http": "dynamic"},
        "service": {"port": "http", "check": {"type": "http", "path": "/", "interval": "1s", "timeout": "1s"}},
        **extra,
    }
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(spec))


def ops_config(path: Path, cluster: NomadCluster, jobs_dir: Path, **nomad: Any) -> Path:
    """The operator's configuration: where Nomad and Consul are, where the specs are."""
    config = {
        "nomad": {"address": cluster.api_url, "jobs_dir": str(jobs_dir), **nomad},
        "consul": {"address": f"http://{cluster.consul.http_addr}"},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def jobs(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`maglev-bridge jobs ...` in this process; exit code, stdout, stderr. `deploy` keeps its default
    timeout (300 s per job): on a loaded machine a rolling update or three restarts of a crashing task take
    well over a minute, and the timeout only bounds a failure."""
    code = main(["jobs", *args])
    out, err = capsys.readouterr()
    return code, out, err


def deploy_spec(
    cluster: NomadCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, count: int, **extra: Any
) -> tuple[int, str]:
    """Write one spec, deploy it; the exit code and everything printed."""
    write_spec(tmp_path / "jobs", name, count, **extra)
    config = ops_config(tmp_path / "ops.yaml", cluster, tmp_path / "jobs")
    code, out, err = jobs(capsys, "deploy", "--config", str(config))
    return code, out + err


def running(cluster: NomadCluster, job_id: str) -> list[dict[str, Any]]:
    allocs = cluster.api(f"/v1/job/{job_id}/allocations") or []
    return [a for a in allocs if a["ClientStatus"] == "running" and a["DesiredStatus"] == "run"]


def http_port(cluster: NomadCluster, alloc_id: str) -> int:
    alloc = cluster.api(f"/v1/allocation/{alloc_id}")
    (port,) = [p["Value"] for p in alloc["AllocatedResources"]["Shared"]["Ports"] if p["Label"] == "http"]
    return int(port)


def passing(consul: ConsulAgent, service: str) -> list[dict[str, Any]]:
    return list(consul.api(f"/v1/health/service/{service}?passing=true") or [])


@pytest.fixture
def cluster(nomad_cluster: NomadCluster) -> Iterator[NomadCluster]:
    """The session cluster, with every job this test registered purged afterwards."""
    yield nomad_cluster
    nomad_cluster.stop_all_jobs()


# -- the agent's own system job -----------------------------------------------------------------------


def test_agent_system_job_runs_one_healthy_director_per_lb_client_found_in_consul_dns(
    cluster: NomadCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    consul = cluster.consul
    agent_config = tmp_path / "agent.yaml"
    agent_config.write_text(yaml.safe_dump({
        "dataplane": "shadow",  # no IPVS on the test host: plan and report only
        "vip_cidrs": ["198.51.100.0/24"],
        "resync_interval": 2,  # the first pass waits for the catalog; do not wait 30 s for the next
        # The job registers the agents as maglev-bridge; their own registration goes under another name.
        "consul": {"address": f"http://{consul.http_addr}", "service_name": "maglev-bridge-self"},
    }))  # fmt: skip
    var_file = tmp_path / "agent.vars.hcl"
    var_file.write_text(f'venv = "{VENV}"\ndatacenters = ["dc1"]\nbackend_class = ""\nstagger = "10s"\n')
    config = ops_config(tmp_path / "ops.yaml", cluster, REPO / "jobs")
    agent = ["--config", str(config), "--agent-config", str(agent_config), "--agent-var-file", str(var_file),
             "--agent-job", str(REPO / "hcl/maglev-bridge.nomad.hcl"), "--only", "maglev-bridge"]  # fmt: skip

    code, out, err = jobs(capsys, "deploy", *agent)
    assert code == 0, out + err
    assert out.splitlines()[-1] == "maglev-bridge: 2/2 running, 2 healthy"

    allocs = running(cluster, "maglev-bridge")
    assert sorted(a["NodeName"] for a in allocs) == ["nomad-c1", "nomad-c3"]  # one per lb client, no more
    assert {a["TaskGroup"] for a in allocs} == {"director"}
    ports = {a["NodeName"]: http_port(cluster, a["ID"]) for a in allocs}
    for port in ports.values():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            assert resp.status == 200
    healthy = passing(consul, "maglev-bridge")
    assert sorted((e["Node"]["Node"], e["Service"]["Port"]) for e in healthy) == sorted(ports.items())
    assert sorted(t for e in healthy for t in e["Service"]["Tags"] if t.startswith("rack=")) == [
        "rack=rack-a", "rack=rack-b"
    ]  # fmt: skip
    assert all("metrics" in e["Service"]["Tags"] and e["Service"]["Meta"]["metrics_path"] == "/metrics"
               for e in healthy), "what examples/prometheus.yml's consul_sd rules select"
    assert sorted((e["Service"]["Meta"]["node"], e["Service"]["Meta"]["role"]) for e in healthy) == [
        ("nomad-c1", "director"), ("nomad-c3", "director")], "the node and role labels Prometheus gives each target"

    r = resolver(consul)
    assert {rr.address for rr in r.resolve("maglev-bridge.service.consul", "A")} == {"127.0.0.1"}
    assert sorted(rr.port for rr in r.resolve("maglev-bridge.service.consul", "SRV")) == sorted(ports.values())

    code, out, _ = jobs(capsys, "plan", *agent)
    assert (code, out.splitlines()[0]) == (0, "maglev-bridge: up to date")
    code, out, _ = jobs(capsys, "status", "--config", str(config), "--agent", "--only", "maglev-bridge")
    assert code == 0 and out.count(" healthy") == 2 and "rack-a" in out and "rack-b" in out

    # A new configuration replaces the directors one at a time (max_parallel 1, stagger), and deploy waits
    # for the last one. Deploy sees one director on the older version from its first look until the stagger
    # has passed, so the stagger is what keeps that line from depending on how fast this machine is today.
    agent_config.write_text(agent_config.read_text() + "drain_timeout: 30\n")
    code, out, err = jobs(capsys, "deploy", *agent)
    assert code == 0, out + err
    assert any(line.endswith(", 1 on an older version") for line in out.splitlines()), out
    assert out.splitlines()[-1] == "maglev-bridge: 2/2 running, 2 healthy"
    assert {a["JobVersion"] for a in running(cluster, "maglev-bridge")} == {1}

    # Stopping the job sends SIGTERM: each agent deregisters itself from Consul before it exits. (The new
    # agents register themselves beside their data plane, and Consul's check of that registration first
    # runs up to 5 s later: wait for it.)
    wait_until(lambda: passing(consul, "maglev-bridge-self"))
    cluster.api("/v1/job/maglev-bridge?purge=true", method="DELETE")
    wait_until(lambda: not consul.api("/v1/health/service/maglev-bridge-self"), timeout=120)


# -- rack-distinct management jobs --------------------------------------------------------------------


def test_count_three_lands_in_three_racks_and_resolves_in_consul_dns(
    cluster: NomadCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = deploy_spec(cluster, tmp_path, capsys, "spread-three", 3)
    assert code == 0, out
    assert out.splitlines()[-1] == "spread-three: deployment successful: 3/3 healthy"

    allocs = running(cluster, "spread-three")
    assert len(allocs) == 3
    assert sorted(RACKS[a["NodeName"]] for a in allocs) == ["rack-a", "rack-b", "rack-c"]
    ports = sorted(http_port(cluster, a["ID"]) for a in allocs)
    healthy = wait_until(lambda: len(h := passing(cluster.consul, "spread-three")) == 3 and h)
    assert sorted(e["Service"]["Port"] for e in healthy) == ports
    r = resolver(cluster.consul)
    assert {rr.address for rr in r.resolve("spread-three.service.consul", "A")} == {"127.0.0.1"}
    assert sorted(rr.port for rr in r.resolve("spread-three.service.consul", "SRV")) == ports
    assert sorted(rr.port for rr in r.resolve("rack=rack-b.spread-three.service.consul", "SRV")) == [
        e["Service"]["Port"] for e in healthy if "rack=rack-b" in e["Service"]["Tags"]
    ]


def test_count_four_over_three_racks_fails_to_place_one_and_deploy_says_so_in_one_line(
    cluster: NomadCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = deploy_spec(cluster, tmp_path, capsys, "spread-four", 4)
    assert code == 1, out
    assert out.splitlines() == [
        "spread-four: 1 of 4 allocation(s) of group 'spread-four' not placed: rack constraint distinct_property "
        "${meta.rack} allows 1 per rack and every rack with a usable node already has 1 (rack-a, rack-b, rack-c)"
    ]
    placed = wait_until(lambda: len(a := running(cluster, "spread-four")) == 3 and a)
    assert sorted(RACKS[a["NodeName"]] for a in placed) == ["rack-a", "rack-b", "rack-c"]


def test_two_per_rack_places_four_over_three_racks_at_most_two_in_each(
    cluster: NomadCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = deploy_spec(cluster, tmp_path, capsys, "two-per-rack", 4, max_per_rack=2)
    assert code == 0, out
    per_rack = Counter(RACKS[a["NodeName"]] for a in running(cluster, "two-per-rack"))
    assert sum(per_rack.values()) == 4 and max(per_rack.values()) <= 2


def test_lost_client_gets_its_allocation_rescheduled_into_the_free_rack(
    cluster: NomadCluster, nomad_binary: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Count 2 over racks a (c1, c2), b (c3), c (c4). The allocation outside rack-a is on the only node of
    its rack; its client stops. The replacement may go neither to the dead node nor to the survivor's rack
    (rack-a's second node is the tempting wrong answer when the survivor is in rack-a), so exactly one rack
    is left for it."""
    code, out = deploy_spec(cluster, tmp_path, capsys, "spread-two", 2)
    assert code == 0, out

    allocs = running(cluster, "spread-two")
    victim = next(a for a in allocs if RACKS[a["NodeName"]] != "rack-a")
    survivor = next(a for a in allocs if a["ID"] != victim["ID"])
    free_rack = ({"rack-a", "rack-b", "rack-c"} - {RACKS[victim["NodeName"]], RACKS[survivor["NodeName"]]}).pop()
    client = next(c for c in cluster.client_agents if c.name == victim["NodeName"])
    client.signal(signal.SIGINT)  # SIGINT: the client leaves without draining; the server marks its node down
    assert client.wait(60)
    try:
        replacement = wait_until(
            lambda: [a for a in running(cluster, "spread-two") if a["ID"] not in (victim["ID"], survivor["ID"])],
            timeout=300,  # the server waits out the heartbeat TTL and grace before it marks the node down
        )[0]
        assert RACKS[replacement["NodeName"]] == free_rack
        assert replacement["NodeName"] != victim["NodeName"]
        lost = cluster.api(f"/v1/allocation/{victim['ID']}")
        assert lost["ClientStatus"] == "lost"
    finally:
        client.start(nomad_binary)
        cluster.wait_ready(cluster.start_timeout)


def test_deploy_stops_following_when_a_task_keeps_failing_and_says_why(
    cluster: NomadCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nomad would reschedule it and fail the deployment only at the progress deadline (5 min). Which of
    Nomad's task events says what is Nomad's business (unit-tested on recorded events in
    test_deploy_failure.py); here: one line naming the allocation, its node, the task and the exit code."""
    code, out = deploy_spec(cluster, tmp_path, capsys, "crashing", 1, command='/bin/sh -c "exit 3"')
    assert code == 1, out
    failed = [line for line in out.splitlines() if " failed: " in line]
    assert len(failed) == 1, out
    said = re.fullmatch(r"crashing: allocation ([0-9a-f]{8}) on (nomad-c\d) failed: crashing: .*Exit Code: 3\b.*",
                        failed[0])  # fmt: skip
    assert said, failed[0]
    alloc = next(a for a in cluster.api("/v1/job/crashing/allocations") if a["ID"].startswith(said[1]))
    assert (alloc["NodeName"], alloc["ClientStatus"]) == (said[2], "failed")
    assert out.splitlines()[-1].endswith("failing; Nomad reschedules the failed allocations")


# -- plan, keeper, TLS --------------------------------------------------------------------------------


def test_plan_exits_0_unchanged_1_changed_2_on_error(
    cluster: NomadCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_spec(tmp_path / "jobs", "planned", 1)
    config = ops_config(tmp_path / "ops.yaml", cluster, tmp_path / "jobs")

    code, out, _ = jobs(capsys, "plan", "--config", str(config))
    assert (code, out.splitlines()[:3]) == (
        1,
        ["planned: would change", "+ Job: 'planned'", "  + Task Group: 'planned' (1 create)"],
    )
    assert jobs(capsys, "deploy", "--config", str(config))[0] == 0
    code, out, _ = jobs(capsys, "plan", "--config", str(config))
    assert (code, out.splitlines()) == (0, ["planned: up to date", "  planned: no change"])

    write_spec(tmp_path / "jobs", "planned", 2)
    code, out, _ = jobs(capsys, "plan", "--config", str(config))
    assert code == 1 and "    +/- Count: '1' => '2' (forces create)" in out.splitlines()

    write_spec(tmp_path / "jobs", "planned", 0)
    code, _, err = jobs(capsys, "plan", "--config", str(config))
    assert code == 2 and "planned.yaml: count: expected an integer from 1 to 1000, got 0" in err

    unreachable = ops_config(tmp_path / "down.yaml", cluster, tmp_path / "jobs")
    unreachable.write_text(unreachable.read_text().replace(cluster.api_url, "http://127.0.0.1:9"))
    write_spec(tmp_path / "jobs", "planned", 1)
    code, _, err = jobs(capsys, "plan", "--config", str(unreachable))
    assert code == 2 and err.startswith("maglev-bridge jobs plan: parse ")


def test_keeper_registers_again_a_job_stopped_by_hand(
    cluster: NomadCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_spec(tmp_path / "jobs", "kept", 1)
    config = parse_config({"nomad": {"address": cluster.api_url, "jobs_dir": str(tmp_path / "jobs")}})
    first = keep_jobs(config)
    assert len(first) == 1 and first[0].startswith("kept: missing from Nomad; registered again (evaluation ")
    wait_until(lambda: running(cluster, "kept"))
    assert keep_jobs(config) == []

    cluster.api("/v1/job/kept", method="DELETE")  # `nomad job stop kept`
    wait_until(lambda: not running(cluster, "kept"))
    again = keep_jobs(config)
    assert len(again) == 1 and again[0].startswith("kept: stopped by hand; registered again")
    assert wait_until(lambda: running(cluster, "kept"))
    assert not cluster.api("/v1/job/kept")["Stop"]


def test_jobs_over_mutual_tls_render_validate_plan_deploy(
    consul_agent: ConsulAgent, nomad_binary: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_spec(tmp_path / "jobs", "over-tls", 1)
    with NomadCluster(nomad_binary, consul_agent, tls=True) as cluster:
        assert cluster.tls is not None and cluster.api_url.startswith("https://")
        tls = {"ca_file": str(cluster.tls.ca), "cert_file": str(cluster.tls.cli_cert),
               "key_file": str(cluster.tls.cli_key), "tls_server_name": "server.global.nomad"}  # fmt: skip
        config = str(ops_config(tmp_path / "ops.yaml", cluster, tmp_path / "jobs", **tls))

        code, out, _ = jobs(capsys, "render", "--config", config, "--out", str(tmp_path / "out"))
        assert code == 0 and (tmp_path / "out/over-tls.nomad.hcl").is_file()
        assert jobs(capsys, "validate", "--config", config)[:2] == (0, "over-tls: valid\n")
        assert jobs(capsys, "plan", "--config", config)[0] == 1
        code, out, err = jobs(capsys, "deploy", "--config", config)
        assert code == 0, out + err
        assert out.splitlines()[-1] == "over-tls: deployment successful: 1/1 healthy"
        assert jobs(capsys, "plan", "--config", config)[0] == 0

        no_cert = ops_config(tmp_path / "no-cert.yaml", cluster, tmp_path / "jobs", ca_file=str(cluster.tls.ca))
        code, _, err = jobs(capsys, "plan", "--config", str(no_cert))
        assert code == 2 and "parse " in err
