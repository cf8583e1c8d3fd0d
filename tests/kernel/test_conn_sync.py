"""IPVS connection synchronisation (`conn_sync`) on a real kernel: the agent starts the master and backup sync
daemons on every director, so a connection to a draining (weight 0) backend survives its flow moving to
another director; without them the other director's Maglev table sends it elsewhere and it is reset."""

from __future__ import annotations

import contextlib

import pytest

from tests.harness.addresses import vip
from tests.harness.agent import AgentHarness
from tests.harness.wait import wait_until

pytestmark = pytest.mark.kernel
SPORTS = range(43000, 43040)


def survivors(topology, conn_sync: bool) -> tuple[int, int]:
    """(connections to the drained backend, how many of them still answer from it after the move)."""
    topo = topology(directors=2, backends=2, clients=1)
    agent = AgentHarness(topo, drain_timeout=600)
    if conn_sync:
        agent.config_overrides["conn_sync"] = {"interface": "eth0", "syncid": 7}
    for b in topo.backends:
        agent.instance("web", b)
    topo.serve(80)
    agent.apply_backends()
    d1, d2 = topo.directors
    for d in (d1, d2):
        out = agent.apply(d)
        if conn_sync:
            assert "start connection sync master on eth0 syncid 7  ok" in out
            assert "start connection sync backup on eth0 syncid 7  ok" in out
    if conn_sync:
        daemons = d1.ipvsadm("-L", "--daemon")
        assert "master sync daemon" in daemons and "backup sync daemon" in daemons and "syncid=7" in daemons
    topo.client.via(d1)
    conns = topo.client.connect(vip(1), 80, sports=SPORTS)
    for _ in range(3):  # the master syncs a connection on its 3rd packet (sync_threshold 3 50)
        assert all(c.ask() == c.backend for c in conns)
    agent.set_status("web", topo.backends[0], "critical")
    for d in (d1, d2):
        agent.apply(d)
    on_b1 = [c for c in conns if c.backend == "b1"]
    if conn_sync:
        wait_until(lambda: d2.ipvsadm("-Lnc").count("ESTABLISHED") >= len(conns), timeout=60,
                   what="d2 holds d1's connections (synced)")
    topo.client.via(d2)
    alive = 0
    for c in on_b1:
        c.timeout = 5
        with contextlib.suppress(OSError):
            alive += c.ask() == "b1"
    return len(on_b1), alive


def test_with_connection_sync_connections_to_a_draining_backend_survive_a_director_move(topology):
    total, alive = survivors(topology, conn_sync=True)
    print(f"conn_sync on: {alive} of {total} connections to the drained backend survived the move")
    assert total > 0 and alive == total


def test_without_connection_sync_they_do_not(topology):
    total, alive = survivors(topology, conn_sync=False)
    print(f"conn_sync off: {alive} of {total} connections to the drained backend survived the move")
    assert total > 0 and alive == 0
