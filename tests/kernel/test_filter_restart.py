"""The agent restarted under traffic leaves the filter without a window: allowed clients are never dropped and
refused ones never get through, because the table is never deleted and the new agent's first pass, on an
unchanged catalog, changes nothing (fail static, like IPVS).

Witnesses, each one continuous across stop and start: an allowed client's long-lived connections asking
every 100 ms (tests/harness/traffic.py) to a VIP no other source sends to, so that VIP's drop counter counts
exactly the allowed client's dropped packets; a refused client opening new connections back to back to a
second VIP; and `nft list` of the agent's table sampled all along."""

from __future__ import annotations

import re
import threading
import time

import pytest

from tests.harness.addresses import vip
from tests.harness.agent import AgentHarness
from tests.harness.netns import VENV_PYTHON
from tests.harness.traffic import Traffic
from tests.harness.wait import wait_until
from tests.kernel.test_filter import drops, ours

pytestmark = pytest.mark.kernel
PROBE = """
import signal, socket, sys, time
stopped = []
signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
while not stopped:
    s = socket.socket()
    s.settimeout(1.0)
    s.bind((sys.argv[2], 0))
    start = time.monotonic()
    try:
        s.connect((sys.argv[1], 80))
        result = "answered"
    except TimeoutError:
        result = "timeout"
    except OSError as e:
        result = type(e).__name__
    finally:
        s.close()
    print(f"{start:.3f} {result}", flush=True)
"""
"""A refused client's new connections to argv[1]:80 from argv[2], one after another until SIGTERM: each
line is when the attempt began and how it ended (a dropped SYN ends in 'timeout' after 1 s)."""


def unchanging(listing: str) -> str:
    """The table's listing without its counters' values, which the refused client's SYNs move."""
    return re.sub(r"packets \d+ bytes \d+", "packets - bytes -", listing)


class Sampler(threading.Thread):
    """`nft -a list table inet maglev_bridge` in the director, back to back, until stopped."""

    def __init__(self, director) -> None:
        super().__init__(daemon=True)
        self.director = director
        self.samples: list[tuple[float, int, str]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            result = self.director.run("nft", "-a", "list", "table", "inet", "maglev_bridge", check=False)
            self.samples.append((time.monotonic(), result.returncode, unchanging(result.stdout)))

    def stop(self) -> list[tuple[float, int, str]]:
        self.done.set()
        self.join(120)
        return self.samples


def test_restarting_the_agent_under_traffic_leaves_no_window_in_the_filter(topology):
    topo = topology(directors=1, backends=2, clients=2)
    d, (allowed, outsider) = topo.directors[0], topo.clients
    agent = AgentHarness(topo)
    web, guarded = vip(1), vip(2)
    for b in topo.backends:
        agent.instance("web", b, tags=[f"maglev.vip={web}:80", f"maglev.allow={allowed.address}/32"])
        agent.instance("guarded", b, tags=[f"maglev.vip={guarded}:80", f"maglev.allow={allowed.address}/32"],
                       index=200 + b.index)
    topo.serve(80)
    agent.apply_backends()
    proc = agent.start(d)
    agent.wait_log(d, "start: applied", timeout=240)
    table = ours(d)

    traffic = Traffic(allowed, web, 80, range(42000, 42020), agent.dir / "allowed.json", VENV_PYTHON)
    traffic.wait_ready()
    probe_log = agent.dir / "refused.log"
    probe = outsider.popen(VENV_PYTHON, "-c", PROBE, guarded, outsider.address, log=probe_log)
    sampler = Sampler(d)
    sampler.start()
    wait_until(lambda: drops(agent, d, guarded) > 0, timeout=120, what="the refused client's SYNs counted")

    stopping = time.monotonic()
    counted = drops(agent, d, guarded)
    assert agent.stop(proc) == 0
    since = len(agent.log(d))
    proc = agent.start(d)
    agent.wait_log(d, "start: nothing to change", timeout=240, since=since)
    started = time.monotonic()

    def attempts() -> list[tuple[float, str]]:
        return [(float(t), result) for t, result in (line.split() for line in probe_log.read_text().splitlines()
                                                     if line.count(" ") == 1)]

    wait_until(lambda: sum(t > started for t, _ in attempts()) >= 3, timeout=120,
               what="the refused client kept trying after the new agent's first pass")
    samples = sampler.stop()
    probe.terminate()
    probe.wait(60)
    recording = traffic.stop()
    assert agent.stop(proc) == 0

    tried = attempts()
    assert [result for _, result in tried] == ["timeout"] * len(tried), "a refused client never got through"
    window = [t for t, _ in tried if stopping - 5 < t < started]
    assert window and max(b - a for a, b in zip([stopping, *window], [*window, started], strict=True)) < 10, \
        f"the refused client tried all through the restart ({stopping:.1f}-{started:.1f}): {tried}"

    assert recording.resets() == [] and recording.unconnected() == [], recording.summary()
    assert all(f.answers[-1] > started for f in recording.flows), \
        f"every allowed connection kept answering after the restart: {recording.summary()}"
    assert drops(agent, d, web) == 0, "not one of the allowed client's packets was dropped"

    during = [s for s in samples if stopping <= s[0] <= started]
    assert during, "the table was sampled while the agent was stopped and starting"
    assert {(code, listing) for _, code, listing in samples} == {(0, unchanging(table))}, \
        "the table, its rules (same handles), sets and counters stayed as they were all along"
    assert drops(agent, d, guarded) > counted, "the drop counter was never reset (never recreated)"
    assert unchanging(ours(d)) == unchanging(table)
