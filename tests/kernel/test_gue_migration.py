"""Moving a running fleet from `fou` to `gue` without resetting a connection (issue 12; the runbook is
docs/gue-migration.md).

Two ways (tests/harness/migration.py): `by-hand`, every step done with ipvsadm and ip exactly as the runbook
says (a prototype of its kernel steps, independent of the agent), and `by-the-agent`, where `maglev-bridge
apply` configures the backends, adds the standby gue real servers (`standby_encapsulation: gue`, step 1),
switches the directors (`encapsulation: gue`) and deletes the fou real servers once no connection entry is left
on them (`retire_encapsulation: fou`, step 3).  Two directors
behind a router's ECMP route, three backends, long-lived connections asking every 100 ms (and some every 2 s;
tests/harness/traffic.py), connection sync on.

The real-server address differs between the modes (tunnel address vs the backend's own), so the Maglev tables
differ (the first test measures it).  What carries a connection across the switch: connection sync (every
director holds an entry for every established connection), real servers of both encapsulations on every
director for the whole migration (the new mode's added at weight 0 beforehand, which leaves the Maglev table
as it is), the old mode's real servers draining at weight 0 instead of being deleted, and the fou links kept
until the last of them is gone.  The other tests measure what goes wrong without each of these.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.migration import AgentMigrationBed, MigrationBed
from tests.harness.netns import Bed
from tests.harness.traffic import Recording
from tests.harness.wait import wait_until

pytestmark = pytest.mark.kernel
OLD = range(40000, 40030)
"""Connections opened in `fou` mode, before the migration."""
SLOW = range(40100, 40110)
"""Connections opened in `fou` mode that ask only every SLOW_INTERVAL seconds: the kernel re-sends a synced
connection every 50 packets, so these are the ones a director's peers hear of least."""
SLOW_INTERVAL = 2.0
MIXED = range(41000, 41030)
"""Connections opened while the directors' modes differ (on d1 by gue, on d2 by fou)."""
GUE = range(42000, 42020)
"""Connections opened once every director is gue; they live through the removal of everything fou."""
PROBES = range(45000, 45024)
HUNG = 5.0
"""A connection without an answer for this long more than its interval is hung.  Under emulation on the loaded
machine every connection at once sometimes goes 2-3.5 s without an answer (the recorder itself was not
scheduled for up to 1 s of that, measured): a pause of the machine, not of the network; a connection whose
packets go nowhere for 3 s stays silent for 7 s or more (TCP's retransmission backoff, measured)."""


@pytest.fixture
def migration(_bed: Bed, request: pytest.FixtureRequest) -> Iterator[Callable[..., MigrationBed]]:
    beds: list[MigrationBed] = []

    def make(kind: type[MigrationBed] = MigrationBed) -> MigrationBed:
        m = kind(_bed)
        m.start()
        beds.append(m)
        return m

    yield make
    for i, m in enumerate(beds):
        if os.environ.get("MAGLEV_VM_OUT"):
            m.keep(Path(os.environ["MAGLEV_VM_OUT"]) / f"{request.node.name}-{i}")


def synced(m: MigrationBed, ports: range) -> None:
    """Until every director holds an entry for each of these connections (the master syncs a connection on
    its 3rd packet and sends within 2 s)."""
    for d in m.directors:
        wait_until(lambda d=d: m.entries(d) >= set(ports), timeout=60, what=f"{d.label} holds every connection")


def flap(m: MigrationBed, away: str, seconds: float = 3) -> None:
    """Take one director out of the router's route and put it back: every flow it carried moves to the other
    one and back (what maintenance, a restart or a BFD flap does)."""
    staying = [d for d in m.directors if d.label != away]
    m.route(staying)
    time.sleep(seconds)
    m.route(m.directors)
    time.sleep(seconds)


def through_each(m: MigrationBed) -> dict[str, dict[int, str]]:
    """The backend each director's Maglev table picks for the probe flows (all routed through one director,
    then the other); the route over both is restored afterwards."""
    picks = {}
    for d in m.directors:
        m.route([d])
        picks[d.label] = m.probe(PROBES)
    m.route(m.directors)
    return picks


def switched(m: MigrationBed, d) -> bool:
    """Every gue real server forwards by tunnel with a weight; every fou one by direct routing at weight 0."""
    found = m.real_servers(d)
    return all(found[m.real_server(b, "gue")][:2] == ("Tunnel", 1)
               and found[m.real_server(b, "fou")][:2] == ("Route", 0) for b in m.backends)


def harmed(rec: Recording, since: float, interval: float = 0.1) -> tuple[list[int], list[int], list[int]]:
    """(reset, changed backend, hung: no answer for HUNG seconds more than its interval after `since`) client
    ports."""
    resets = [f.sport for f in rec.resets()]
    changed = [f.sport for f in rec.changed_backend()]
    hung = [f.sport for f in rec.flows if f.sport not in resets and rec.gap(f, since) >= HUNG + interval]
    return resets, changed, hung


@pytest.mark.parametrize("kind", [MigrationBed, AgentMigrationBed], ids=["by-hand", "by-the-agent"])
def test_the_migration_resets_no_connection(migration, kind):
    """by-hand: every step with ipvsadm and ip; by-the-agent: every step by `maglev-bridge apply`
    (`standby_encapsulation: gue`, then `encapsulation: gue`, then `retire_encapsulation: fou`), which is also
    shown deleting nothing while connections are on the fou real servers."""
    m = migration(kind)
    d1, d2 = m.directors
    old = m.traffic(OLD, "old")
    slow = m.traffic(SLOW, "slow", interval=SLOW_INTERVAL)
    synced(m, OLD)
    synced(m, SLOW)
    fou_tables = through_each(m)
    assert fou_tables["d1"] == fou_tables["d2"], "two fou directors agree"

    # 1. standby: the gue real servers on every director, at weight 0, added at weight 0
    for d in m.directors:
        m.add_standby(d, "gue")
    with_standby = through_each(m)
    assert with_standby == fou_tables, "real servers added at weight 0 leave the Maglev table as it is"

    # 2. d1 switches: gue real servers get their weights, fou real servers drain at weight 0 (links kept)
    m.switch(d1, "fou", "gue")
    assert switched(m, d1), f"d1: gue real servers with weights, fou ones draining: {m.real_servers(d1)}"
    assert m.links(d1), "d1 keeps its fou links while fou real servers drain"
    mixed = through_each(m)
    differ = sum(mixed["d1"][p] != mixed["d2"][p] for p in PROBES)
    print(f"fou and gue directors' tables: {differ} of {len(PROBES)} probe flows pick another backend")
    assert differ, "a gue director's Maglev table differs from a fou director's"
    mixed_traffic = m.traffic(MIXED, "mixed")
    synced(m, MIXED)
    before = m.packets(d2)
    flap(m, "d1")  # new flows d1 sent by GUE now reach d2 (fou): they must use d2's standby gue real servers
    gue_on_d2 = wait_until(lambda: {b.label: m.packets(d2).get(b.address, 0) - before.get(b.address, 0)
                                    for b in m.backends if m.packets(d2).get(b.address, 0) > before.get(b.address, 0)},
                           timeout=30, what="d2 (fou) forwards d1's gue connections by its standby gue real servers")
    print(f"d2, still fou, carried d1's gue connections through its weight-0 gue real servers: {gue_on_d2}")

    # 2'. d2 switches; then both are gue and agree again
    m.switch(d2, "fou", "gue")
    assert switched(m, d2), f"d2: gue real servers with weights, fou ones draining: {m.real_servers(d2)}"
    before = m.packets(d1)
    flap(m, "d2")  # d2's old (fou) connections reach d1 (gue): d1's draining fou real servers carry them
    fou = [m.real_server(b, "fou") for b in m.backends]
    fou_on_d1 = wait_until(lambda: sum(m.packets(d1).get(a, 0) - before.get(a, 0) for a in fou), timeout=30,
                           what="d1 (gue) forwards old connections by its draining fou real servers")
    print(f"d1, now gue, carried fou connections through its draining fou real servers: {fou_on_d1} packets")
    gue_tables = through_each(m)
    assert gue_tables["d1"] == gue_tables["d2"], "two gue directors agree"
    gue = m.traffic(GUE, "gue")
    synced(m, GUE)

    # 3. the connections on fou real servers end (the old ones, and the mixed ones d2 opened while still fou);
    # once no fou real server holds a connection entry on any director, delete them, then the links, then the
    # backends' FOU receiver
    if kind is AgentMigrationBed:  # retired while connections are on them: the agent deletes nothing
        m.remove_fou(d1)
        assert set(fou) <= set(m.real_servers(d1)) and m.links(d1), "d1 keeps fou real servers with connections"
    old_rec, slow_rec, mixed_rec = old.stop(), slow.stop(), mixed_traffic.stop()
    for d in m.directors:
        wait_until(lambda d=d: all(m.real_servers(d)[a][2:] == (0, 0) for a in fou), timeout=120,
                   what=f"no connection entry on {d.label}'s fou real servers")
    t_cleanup = time.monotonic()
    removed = []
    for d in m.directors:
        m.remove_fou(d)
        removed.append(time.monotonic())
        assert not set(fou) & set(m.real_servers(d)), f"{d.label}: the fou real servers are gone"
        assert not m.links(d), f"{d.label}: the fou links are gone with the last fou real server"
    print(f"fou real servers deleted on d1 and d2 {removed[1] - removed[0]:.1f} s apart")
    m.receive(["gue"])
    pure = through_each(m)
    assert pure["d1"] == pure["d2"], "gue directors without fou real servers agree"
    moved = sum(pure["d1"][p] != gue_tables["d1"][p] for p in PROBES)
    print(f"deleting the drained fou real servers changed {moved} of {len(PROBES)} probe flows' table entry")
    flap(m, "d1")
    gue_rec = gue.stop()

    for name, rec, ports, interval in (("old", old_rec, OLD, 0.1), ("slow", slow_rec, SLOW, SLOW_INTERVAL),
                                       ("mixed", mixed_rec, MIXED, 0.1), ("gue", gue_rec, GUE, 0.1)):
        print(f"{name}: {rec.summary()}")
        assert len(rec.flows) == len(ports) and not rec.unconnected()
        resets, changed, hung = harmed(rec, rec.ready, interval)
        assert not resets and not changed and not hung, f"{name}: reset {resets}, changed {changed}, hung {hung}"
    assert t_cleanup < gue_rec.end


@pytest.mark.parametrize("design", ["real-servers-replaced", "withdraw-replace-return", "no-standby"])
def test_without_each_part_connections_are_harmed(migration, design):
    """What each shortcut costs, measured on d1's switch alone (d2 stays fou), with every connection opened
through d1 (the router's route over d1 alone), so that each is exposed:

    * real-servers-replaced: links kept and connections synced, but the fou real servers are deleted and the
      gue ones added in their place: d1's entries lose their real server, expire_nodest_conn expires them (at
      once, Linux 5.9+), and the gue table schedules each flow again at its next packet: those that land on
      another backend are reset;
    * withdraw-replace-return: d1 is taken out of the route, switched (real servers replaced, links kept) and
      put back 3 s later. Deleting the real servers expires every entry bound to them at once (Linux 5.9+,
      expire_nodest_conn), d1's own and the synced ones; d2 re-sends a connection only every 50 packets, so a
      connection that asks every 2 s has no entry on d1 when its flow returns, and the gue table schedules it
      (with connections asking every 100 ms, re-sent within the 3 s, nothing was harmed: that is why these
      ask slowly);
    * no-standby: d1 switches as the runbook says, but d2 (still fou) has no gue real servers: connections d1
      opened by gue are synced to d2 as entries without a real server (the sync message carries the forwarding
      method, not the GUE port, which only a real server holds), and while their flows are on d2 they get no
      answer (measured on Debian's 6.1: no reset, no kernel message, the packets go nowhere; they come back
      when the flows return to d1).
    """
    m = migration()
    d1, d2 = m.directors
    m.route([d1])
    if design == "no-standby":
        m.add_real_servers(d1, "gue")
        m.set_weights(d1, "fou", 0)
    interval = SLOW_INTERVAL if design == "withdraw-replace-return" else 0.1
    old = m.traffic(OLD, "old", interval=interval)
    synced(m, OLD)
    t_change = time.monotonic()
    if design == "no-standby":
        m.route([d2])
        time.sleep(3)
        t_back = time.monotonic()
        m.route([d1])
    elif design == "real-servers-replaced":
        m.delete_real_servers(d1, "fou")
        m.add_real_servers(d1, "gue")
    else:
        m.route([d2])
        time.sleep(3)
        m.delete_real_servers(d1, "fou")
        m.add_real_servers(d1, "gue")
        time.sleep(3)
        m.route([d1])
    time.sleep(5)
    rec = old.stop()
    resets, changed, hung = harmed(rec, t_change, interval)
    if design == "no-standby":  # silent while d2 carried them (the first 0.5 s: answers already on their way)
        hung = [f.sport for f in rec.flows if not any(t_change + 0.5 < t < t_back for t in f.answers)]
    print(f"{design}: {len(resets)} reset, {len(changed)} changed backend, {len(hung)} hung of {len(rec.flows)}; "
          f"{rec.summary()}")
    assert resets or changed or hung, f"{design} harmed nothing: {rec.summary()}"
