"""Benchmark (issue 13): what a backend agent pays for changes elsewhere in the fleet, and how fast its own
instance's change reaches its kernel.

A real Consul agent and the real backend agent (`maglev-bridge -v run --role backend`, watching its own node,
bridge/catalog/node.py) run in a network namespace the bench creates. The fleet: BENCH_SERVICES tagged
services x BENCH_INSTANCES instances on BENCH_NODES other nodes, each instance with its own check, plus one
tagged service on the agent's own node.

(a) CPU per change elsewhere: BENCH_ELSEWHERE edits of other nodes' instances (check status, tag edits
    with and without the check, one after the other as Consul acknowledges them), the agent's CPU
    (utime+stime from /proc/<pid>/stat) over them minus its CPU at the rate of an idle window of BENCH_IDLE
    seconds measured just before (the baseline), divided by the number of edits; with how many answers its
    catalog source got and how many changes it reported (/health) over them.
(b) own change -> kernel change: BENCH_OWN tag edits of its own instance adding or removing a second VIP
    (the service alone, as Nomad re-registers it), the time from Consul's acknowledgement of the write to the
    VIP appearing on (or leaving) `lo` in the namespace, polled through netlink every 1 ms; BENCH_GAP (0.2 s)
    between one change's arrival and the next edit. Each of the source's two blocking queries re-arms at
    most 10 times a second after a burst of 20 (the token bucket of `consul.Watch`): own changes closer
    than 100 ms apart, for long, wait for it (~100 ms each), which is what a gap of 0.05 s measures.

(c) what the node's desired state costs per own change, for nodes of BENCH_NODE_SIZES (50 and 500) tagged
    instances registered in the same Consul: one instance's check changed, the node's two answers as Consul
    gives them, then in this process, timed in CPU: the answers parsed into instances (`parse_node`, every
    pass), the desired state computed afresh from the whole node as the agent did before (its claims, and
    a whole `compute_desired` for its rejections) and as the agent does now (`NodeBook`, kept per service,
    as the director's DesiredBook). `--recompute` runs (c) alone (a Consul of its own, no namespace, no agent).

This host has no fou or ipip module: the agent's fou and tunl0 steps fail on every pass here (logged, and
the agent's retries are in the idle baseline too); the VIP on `lo` and the sysctls are real. Prints
figures, asserts nothing. Goal (issue 13): ~0 CPU per change elsewhere, p99 < 100 ms for (b).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from pyroute2 import IPRoute

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.catalog.consul_format import parse_node  # noqa: E402
from bridge.core.config import load_config  # noqa: E402
from bridge.core.desired import claims_of_node, compute_desired  # noqa: E402
from bridge.core.node_book import NodeBook  # noqa: E402
from tests.harness.binaries import hashicorp_binary  # noqa: E402
from tests.harness.consul_agent import ConsulAgent  # noqa: E402
from tests.harness.netns import VENV_PYTHON, Bed, Netns  # noqa: E402
from tests.harness.wait import wait_until  # noqa: E402

SERVICES = int(os.environ.get("BENCH_SERVICES", "200"))
INSTANCES = int(os.environ.get("BENCH_INSTANCES", "5"))
NODES = int(os.environ.get("BENCH_NODES", "100"))
ELSEWHERE = int(os.environ.get("BENCH_ELSEWHERE", "2000"))
OWN_CHANGES = int(os.environ.get("BENCH_OWN", "100"))
GAP = float(os.environ.get("BENCH_GAP", "0.2"))
IDLE = float(os.environ.get("BENCH_IDLE", "10"))
NODE_SIZES = tuple(int(n) for n in os.environ.get("BENCH_NODE_SIZES", "50,500").split(","))
STATUSES = ("critical", "passing", "warning")
OWN = "own"
HTTP_PORT = 9119
AGENT = str(Path(VENV_PYTHON).parent / "maglev-bridge")


def vip_tags(*last: int) -> list[str]:
    return [f"maglev.vip=198.51.100.{n}:80" for n in last]


def register(consul: ConsulAgent, node: str, address: str, service: str, tags: list[str],
             status: str | None = "passing") -> None:
    sid = f"{service}-{node}"
    body: dict[str, Any] = {"Node": node, "Address": address,
                            "Service": {"ID": sid, "Service": service, "Port": 80, "Tags": tags}}
    if status is not None:
        body["Check"] = {"CheckID": f"service:{sid}", "Name": "ttl", "Status": status, "ServiceID": sid}
    consul.api("/v1/catalog/register", method="PUT", body=body)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def catalog_health(ns: Netns) -> dict[str, Any]:
    with ns.entered(), urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/health", timeout=5) as resp:
        return dict(json.loads(resp.read())["catalog"])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    if sys.argv[1:] == ["--recompute"]:
        with ConsulAgent(hashicorp_binary("consul")) as consul:
            recompute(consul)
        return
    bed = Bed()
    try:
        name = f"mb-bw-{os.getpid()}"
        bed.add_netns(name)
        ns = Netns(name, bed)
        ns.run("ip", "link", "set", "lo", "up")
        with ns.entered():
            consul = ConsulAgent(hashicorp_binary("consul")).start()
        try:
            run(bed, ns, consul)
        finally:
            with ns.entered():
                consul.close()
    finally:
        bed.teardown()


def run(bed: Bed, ns: Netns, consul: ConsulAgent) -> None:
    fleet = [(f"svc{s}", f"node{(s * INSTANCES + i) % NODES}", f"192.0.2.{1 + (s * INSTANCES + i) % NODES % 250}")
             for s in range(SERVICES) for i in range(INSTANCES)]
    with ns.entered():
        for service, node, address in fleet:
            register(consul, node, address, service, vip_tags(10 + int(service[3:]) % 200))
        register(consul, OWN, "192.0.2.250", "web", vip_tags(1))
    tmp = Path(tempfile.mkdtemp(prefix="maglev-bench-backend-"))
    config = tmp / "backend.yaml"
    config.write_text(yaml.safe_dump({
        "role": "backend", "node_name": OWN, "vip_cidrs": ["198.51.100.0/24"],
        "tunnel_map": [{"backend": "192.0.2.0/24", "tunnel": "203.0.113.0/24"}],
        "state_file": str(tmp / "state.json"), "http_bind": f"127.0.0.1:{HTTP_PORT}", "resync_interval": 3600,
        "consul": {"address": f"http://127.0.0.1:{consul.http_port}", "wait": "5m"}}))
    proc = ns.popen(AGENT, "-v", "run", "--role", "backend", "--config", str(config), log=tmp / "agent.log")
    with ns.entered():
        ipr = IPRoute()

    def vips() -> set[str]:
        return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=1, family=2)} - {"127.0.0.1"}

    wait_until(lambda: vips() == {"198.51.100.1"}, timeout=300, what="the agent's first pass")
    wait_until(lambda: catalog_health(ns)["changes"] >= 1, timeout=60, what="/health")
    print(f"fleet: {SERVICES} services x {INSTANCES} instances on {NODES} other nodes; "
          f"load average {os.getloadavg()[0]:.1f}")

    # (a) changes elsewhere, against an idle window measured just before
    rng = random.Random(13)
    time.sleep(2)
    idle_cpu0, idle_started = cpu_seconds(proc.pid), time.monotonic()
    time.sleep(IDLE)
    idle_rate = (cpu_seconds(proc.pid) - idle_cpu0) / (time.monotonic() - idle_started)
    before, cpu0, started = catalog_health(ns), cpu_seconds(proc.pid), time.monotonic()
    with ns.entered():
        for k in range(ELSEWHERE):
            service, node, address = rng.choice(fleet)
            tags = vip_tags(10 + int(service[3:]) % 200, *((9,) if k % 4 == 1 else ()))
            register(consul, node, address, service, tags, status=None if k % 2 else rng.choice(STATUSES))
    wall, busy_cpu = time.monotonic() - started, cpu_seconds(proc.pid) - cpu0
    time.sleep(1)
    after = catalog_health(ns)
    per_edit = max(0.0, busy_cpu - idle_rate * wall) / ELSEWHERE
    print(f"(a) {ELSEWHERE} edits on other nodes in {wall:.1f} s: answers to the agent's watch "
          f"{after['answers'] - before['answers']}, changes {after['changes'] - before['changes']}; agent CPU "
          f"{busy_cpu * 1000:.0f} ms, idle baseline {idle_rate * wall * 1000:.0f} ms over the same time: "
          f"{per_edit * 1e6:.0f} us per edit elsewhere (CPU clock tick {1e3 / os.sysconf('SC_CLK_TCK'):.0f} ms)")

    # (b) own change -> VIP on lo
    latencies = []
    for k in range(OWN_CHANGES):
        adding = k % 2 == 0
        want = {"198.51.100.1", "198.51.100.2"} if adding else {"198.51.100.1"}
        with ns.entered():
            register(consul, OWN, "192.0.2.250", "web", vip_tags(1, 2) if adding else vip_tags(1), status=None)
        acked = time.monotonic()
        while vips() != want:
            if time.monotonic() - acked > 30:
                raise SystemExit(f"own change {k} did not reach the kernel in 30 s")
            time.sleep(0.001)
        latencies.append((time.monotonic() - acked) * 1000)
        time.sleep(GAP)
    print(f"(b) own instance's tag edit -> VIP on/off lo, {OWN_CHANGES} changes: p50 {pct(latencies, 0.5):.1f} ms, "
          f"p99 {pct(latencies, 0.99):.1f} ms, max {max(latencies):.1f} ms")
    ipr.close()
    proc.terminate()
    proc.wait(60)
    with ns.entered():
        recompute(consul)


def recompute(consul: ConsulAgent, rounds: int = 100) -> None:
    """(c): the desired-state part of a backend pass on nodes of NODE_SIZES instances, per change of one of
    them, from Consul's own answers: computed afresh from the whole node as the agent did before (the
    node's claims, and a whole `compute_desired` for its rejections), against the book the agent keeps now."""
    tmp = Path(tempfile.mkdtemp(prefix="maglev-bench-backend-"))
    for size in NODE_SIZES:
        node = f"big{size}"

        def put(i: int, status: str, node: str = node) -> None:
            register(consul, node, "192.0.2.249", f"app{i}", [f"maglev.vip=198.51.100.{10 + i % 200}:{1000 + i}"],
                     status=status)

        for i in range(size):
            put(i, STATUSES[i % 7 // 5])  # one in seven critical
        config_path = tmp / f"{node}.yaml"
        config_path.write_text(yaml.safe_dump({
            "role": "backend", "node_name": node, "vip_cidrs": ["198.51.100.0/24"],
            "tunnel_map": [{"backend": "192.0.2.0/24", "tunnel": "203.0.113.0/24"}]}))
        config = load_config(config_path)
        book = NodeBook(config)
        spent: dict[str, list[float]] = {"parse_node": [], "before: afresh": [], "now: the book": []}
        for k in range(rounds + 1):
            put(k % size, STATUSES[(k + 1) % 2])  # one instance's check: critical, passing, ...
            answers = [urllib.request.urlopen(f"{consul.http_url}{path}{node}", timeout=30).read()
                       for path in ("/v1/catalog/node-services/", "/v1/health/node/")]
            t0 = time.process_time()
            snapshot = parse_node(*answers, "maglev.vip")
            t1 = time.process_time()
            assert snapshot is not None
            claims, _ = claims_of_node(snapshot, config, node)
            own = {i.instance_id for i in snapshot.instances if i.node == node}
            rejected = tuple(r for r in compute_desired(snapshot, config, "0.0.0.0").rejected if r.instance in own)
            t2 = time.process_time()
            kept = book.update(snapshot)
            t3 = time.process_time()
            assert kept.vips == {c.vip for c in claims} and kept.rejected == rejected
            if k:  # the first update fills the book
                for step, took in zip(spent, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                    spent[step].append(took * 1000)
        parts = ", ".join(f"{step} {statistics.median(took):.2f}" for step, took in spent.items())
        print(f"(c) a node of {size} tagged instances ({len(claims)} claims, answers {sum(map(len, answers)):,} "
              f"bytes), one instance's check changed: CPU ms per change, median of {rounds}: {parts}")


if __name__ == "__main__":
    main()
