"""Zero-downtime maintenance and director failure, through a real router (issue 9): clients behind a BIRD
router routing the VIP over three directors by ECMP (BGP + BFD), each director configured only by its
`maglev-bridge run`, 60 long-lived connections asking every 100 ms.  Every test asserts that no
connection was reset and none changed backend; the gaps are measured by the traffic recorder."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.addresses import ROUTER_ADDRESS
from tests.harness.failover import CONNECTIONS, FailoverBed
from tests.harness.netns import Bed
from tests.harness.router_bed import CALM_BFD, EXAMPLE_BFD
from tests.harness.traffic import Recording
from tests.harness.wait import wait_until

pytestmark = pytest.mark.kernel
MAX_GAP = 1.0


@pytest.fixture
def failover(_bed: Bed, request: pytest.FixtureRequest) -> Iterator[Callable[..., FailoverBed]]:
    """A FailoverBed factory; the beds' logs (BIRD, agents, recordings) are copied to the VM's output folder,
    which boot.py keeps when the run fails."""
    beds: list[FailoverBed] = []

    def make(**kwargs: object) -> FailoverBed:
        bed = FailoverBed(_bed, **kwargs)  # type: ignore[arg-type]
        beds.append(bed)
        return bed

    yield make
    for i, bed in enumerate(beds):
        if bed.watcher:
            bed.watcher.stop()
        if os.environ.get("MAGLEV_VM_OUT"):
            bed.keep(Path(os.environ["MAGLEV_VM_OUT"]) / f"{request.node.name}-{i}")


def unharmed(rec: Recording, bed: FailoverBed) -> None:
    assert len(rec.flows) == CONNECTIONS and not rec.unconnected()
    assert not rec.resets(), f"reset: {[(f.sport, f.error) for f in rec.resets()]}\n{bed.diagnostics()}"
    assert not rec.changed_backend(), f"changed backend: {[(f.sport, f.backends) for f in rec.changed_backend()]}"


def gaps_below_a_second(rec: Recording, bed: FailoverBed, since: float | None = None, what: str = "") -> None:
    """Every connection's longest gap < 1 s.  When it is not, and the recorder itself or the router's BIRD
    was not scheduled for long enough to explain it (the emulated VM stalls under load; both are measured),
    the test is marked xfail with the figures instead: the timing then measured the machine."""
    worst = max(rec.gaps(since))
    why = f"{rec.summary(since)}; {bed.bfd_report()}{what}"
    print(why)
    if worst >= MAX_GAP and (rec.longest_stall(since) >= worst - MAX_GAP or bed.router.router_bird.stalls()):
        pytest.xfail(f"the emulated VM stalled: {why}")
    assert worst < MAX_GAP, why


def running(failover: Callable[..., FailoverBed], **kwargs: object) -> FailoverBed:
    """A bed with every director announcing and the connections open, spread over every director (each
    director's IPVS holds some of them) and every backend."""
    bed = failover(**{"bfd_timing": CALM_BFD, **kwargs})
    bed.start()
    bed.start_traffic()
    by_director = bed.connections_by_director()
    assert all(by_director.values()), f"connections per director: { {k: len(v) for k, v in by_director.items()} }"
    return bed


def sessions_on_metrics(director) -> dict[str, float]:
    """The director's /metrics: whether it read its BIRD, each BGP session's state by peer and each BFD
    session's by neighbour."""
    with director.entered(), urllib.request.urlopen("http://127.0.0.1:9119/metrics", timeout=30) as answer:
        families = text_string_to_metric_families(answer.read().decode())
    return {s.labels.get("peer", s.labels.get("neighbor", s.name)): s.value for f in families for s in f.samples
            if s.name in ("maglev_bridge_bgp_session_up", "maglev_bridge_bfd_session_up",
                          "maglev_bridge_bird_read_ok")}


def test_maintenance_moves_a_director_out_of_rotation_and_back_without_harming_a_connection(failover):
    bed = running(failover)
    d1, d2, d3 = bed.directors
    wait_until(lambda: sessions_on_metrics(d1).get(ROUTER_ADDRESS) == 1, timeout=60,
               what="d1's BFD session to the router Up on its /metrics")
    sessions = sessions_on_metrics(d1)
    assert sessions.pop("maglev_bridge_bird_read_ok") == 1 and set(sessions.values()) == {1}, \
        f"/metrics reads the director's BIRD, whose BGP session and its BFD session to the router are up: {sessions}"
    announced = bed.watch_announcement(d1)
    bed.hold(2)
    t_on = time.monotonic()
    out = bed.maintenance(d1, "on")
    assert "maintenance on: withdrew 1 VIP(s) 198.51.100.1" in out, out
    bed.wait_route([d2, d3])
    t_out = bed.dropped(d1, t_on)
    announced.stop()
    t_withdrawn = announced.changes[-1][0]
    assert announced.current() == frozenset()
    print(f"maintenance on -> d1's announce route deleted after {t_withdrawn - t_on:.3f} s -> router dropped d1 "
          f"{t_out - t_withdrawn:.3f} s later (BIRD learns, BGP withdraw, router BIRD, router kernel)")
    bed.hold(3)
    bed.maintenance(d1, "off")
    bed.wait_route([d1, d2, d3], timeout=60)
    bed.hold(3)
    rec = bed.stop_traffic()
    unharmed(rec, bed)
    assert set(rec.spread()) == {"b1", "b2", "b3"}
    gaps_below_a_second(rec, bed, what=f"; withdrawn {t_out - t_on:.3f} s after the command")


def test_a_director_unplugged_is_removed_by_bfd_and_every_connection_answers_again_within_a_second(failover):
    bed = running(failover, bfd_timing=EXAMPLE_BFD)
    d1, d2, d3 = bed.directors
    bed.hold(2)
    t_fail = time.monotonic()
    d1.unplug()
    bed.wait_route([d2, d3], timeout=30)
    t_gone = bed.dropped(d1, t_fail)
    print(f"unplugged -> BFD, router dropped d1 after {t_gone - t_fail:.3f} s")
    bed.hold(3)
    rec = bed.stop_traffic()
    unharmed(rec, bed)
    gaps_below_a_second(rec, bed, since=t_fail - 0.5, what=f"; BFD removed d1 {t_gone - t_fail:.3f} s after the unplug")


def test_restarting_the_agent_never_changes_the_routers_route(failover):
    bed = running(failover)
    d1 = bed.directors[0]
    changes = len(bed.watcher.changes)
    assert bed.stop_agent(d1) == 0
    bed.start_agent(d1)
    bed.agents.wait_log(d1, "start: nothing to change", timeout=180)
    bed.hold(3)
    rec = bed.stop_traffic()
    assert bed.watcher.changes[changes:] == [], "the router saw a change while the agent restarted"
    unharmed(rec, bed)
    gaps_below_a_second(rec, bed)


def test_a_director_that_cannot_read_its_catalog_announces_nothing_until_its_first_pass(failover):
    bed = failover(bfd_timing=CALM_BFD)
    d1, d2, d3 = bed.directors
    late = bed.agents.dir / "d3-catalog.json"
    bed.agents.catalog_of["d3"] = late
    bed.start([d1, d2])
    bed.start_traffic()
    bed.start_agent(d3)
    bed.agents.wait_log(d3, "cannot read catalog", timeout=180)
    bed.hold(2)
    assert bed.watcher.current() == frozenset({d1.address, d2.address}), "announced before its first pass"
    assert "TCP" not in d3.ipvsadm("-Ln")
    late.write_text(bed.agents.catalog_path.read_text())
    bed.wait_route([d1, d2, d3], timeout=120)
    bed.hold(3)
    wait_until(lambda: bed.connections_by_director()["d3"], timeout=30, what="d3 carrying connections")
    rec = bed.stop_traffic()
    unharmed(rec, bed)
    gaps_below_a_second(rec, bed)


@pytest.mark.parametrize("conn_sync", [False, True], ids=["without-sync", "with-sync"])
def test_connections_to_a_draining_backend_survive_maintenance_only_with_connection_sync(failover, conn_sync):
    bed = running(failover, conn_sync=conn_sync)
    d1, d2, d3 = bed.directors
    b1 = bed.topology.backends[0]
    bed.agents.set_status("web", b1, "critical")
    for d in bed.directors:
        bed.agents.wait_log(d, "weight 0 in 198.51.100.1:80/tcp", timeout=60)
    bed.hold(2)
    bed.maintenance(d1, "on")
    bed.wait_route([d2, d3])
    bed.hold(3)
    rec = bed.stop_traffic()
    on_b1 = [f for f in rec.flows if f.backend == "b1"]
    harmed = [f for f in on_b1 if f in rec.resets() or f in rec.changed_backend()]
    print(f"conn_sync={conn_sync}: {len(harmed)} of {len(on_b1)} connections to the drained backend harmed; "
          f"{rec.summary()}")
    assert on_b1, "no connection was on the drained backend"
    if conn_sync:
        unharmed(rec, bed)
    else:
        # the point of the option: without it, what d1 carried to the drained backend is lost
        assert harmed, f"expected connections to the drained backend to break without sync; {rec.summary()}"
        assert all(f.backend == "b1" for f in rec.resets()), "only the drained backend's connections may break"
