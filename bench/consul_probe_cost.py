"""Benchmark (issue 13): what a sweep's 2,000 index probes cost, asked of the local agent's cache (`?cached`)
or not, in the topology of a real director: a Consul client agent (the director's local agent) joined to a
server, the probes sent to the client agent, which forwards uncached reads to the server.

Measured, each as a median of 3 interleaved rounds: the sweep's wall time, this process's CPU, the client
agent's and the server's CPU (utime+stime from /proc); then the two agents' CPU over 20 s idle without and
with the 2,000 cache entries (each kept current by a background blocking query to the server); then, for 20
registrations, how long the cache took to show the new index (the lag that makes the agent never trust an
unchanged cached index: bridge/catalog/consul.py). Prints figures, asserts nothing. A few minutes.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.consul_latency import Client, build_instances, cpu_seconds, newcomer  # noqa: E402
from bridge.catalog.consul import CACHED, PROBE_TAG  # noqa: E402
from bridge.catalog.consul_probe import Endpoint, probe_indexes  # noqa: E402
from tests.harness.consul_agent import ConsulAgent  # noqa: E402

PROBERS = 2
IDLE = 20.0


async def indexes(endpoint: Endpoint, names: list[str]) -> list[int]:
    found: list[int] = []
    async for batch in probe_indexes(endpoint, [f"/v1/catalog/service/{name}" for name in names], 30):
        found += batch
    return found


async def sweep(endpoint: Endpoint, names: list[str]) -> None:
    """As the agent sweeps: the names split over PROBERS pipelined connections."""
    await asyncio.gather(*(indexes(endpoint, names[n::PROBERS]) for n in range(PROBERS)))


def main() -> None:
    build = subprocess.run(["bash", str(ROOT / "scripts/build-hashicorp.sh"), "consul"], check=True,
                           capture_output=True, text=True)
    binary = build.stdout.strip().splitlines()[-1]
    with ConsulAgent(binary, log_level="WARN") as server, \
            ConsulAgent(binary, log_level="WARN", join=server.serf_lan_addr, node_name="director") as agent:
        assert server.proc is not None and agent.proc is not None
        pids = {"local agent": agent.proc.pid, "server": server.proc.pid}
        client = Client(server.http_port)
        instances = build_instances()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda inst: client.register(inst, "passing"), instances))
        names = sorted({inst.service for inst in instances})
        params = (("stale", "1"), ("tag", PROBE_TAG))
        uncached = Endpoint("127.0.0.1", agent.http_port, None, None, {}, params)
        cached = Endpoint("127.0.0.1", agent.http_port, None, None, {}, (*params, CACHED))

        def idle(label: str) -> None:
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            time.sleep(IDLE)
            spent = ", ".join(f"{name} {cpu_seconds(pid) - before[name]:.2f} s" for name, pid in pids.items())
            print(f"idle {IDLE:.0f} s, {label}: {spent} (load {os.getloadavg()[0]:.1f})", flush=True)

        asyncio.run(sweep(uncached, names))
        idle("no cache entries")
        start = time.time()
        asyncio.run(sweep(cached, names))
        print(f"first sweep of the cache (every entry missed): {1000 * (time.time() - start):.0f} ms", flush=True)
        time.sleep(3)
        idle("2,000 cache entries")
        rounds: dict[str, list[tuple[float, ...]]] = {"uncached": [], "cached": []}
        for _ in range(3):
            for label, endpoint in (("uncached", uncached), ("cached", cached)):
                before = [cpu_seconds(pid) for pid in pids.values()]
                wall, own = time.time(), time.process_time()
                asyncio.run(sweep(endpoint, names))
                rounds[label].append((time.time() - wall, time.process_time() - own,
                                      *(cpu_seconds(pid) - b for pid, b in zip(pids.values(), before, strict=True))))
                time.sleep(1)
        print(f"sweeps of {len(names)} probes on {PROBERS} connections, medians of 3 (load "
              f"{os.getloadavg()[0]:.1f}): wall, this process, local agent, server CPU")
        for label, samples in rounds.items():
            wall, own, local, remote = (1000 * statistics.median(s[i] for s in samples) for i in range(4))
            print(f"  {label:<9} {wall:5.0f} ms  {own:4.0f} ms  {local:4.0f} ms  {remote:4.0f} ms")
        lags: list[tuple[float, int]] = []
        for inst in instances[:40:2]:
            arriving = newcomer(inst)
            before_index = asyncio.run(indexes(uncached, [arriving.service]))[0]
            client.register(arriving, "passing")
            written, stale = time.time(), 0
            while asyncio.run(indexes(cached, [arriving.service]))[0] == before_index:
                stale += 1
            lags.append((time.time() - written, stale))
            client.deregister(arriving)
            time.sleep(0.2)
        print(f"the cache after a registration: new index at the first probe in {sum(1 for _, s in lags if not s)} "
              f"of {len(lags)}; longest until seen {1000 * max(lag for lag, _ in lags):.1f} ms")


if __name__ == "__main__":
    main()
