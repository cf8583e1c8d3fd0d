"""The rules of what a director announces, its sysctls and maintenance, on the planner and the agent's passes
(a model data plane; tests/kernel/test_announce.py proves the same on the real kernel)."""

from __future__ import annotations

import ipaddress
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import replace

from bridge.agent.backend import BackendReconciler
from bridge.agent.http import serve
from bridge.agent.reconcile import SKIPPED, director_pass
from bridge.agent.shell import Agent
from bridge.core.announce import Announcing
from bridge.core.desired import compute_desired
from bridge.core.live import LiveState
from bridge.core.memory import Memory
from bridge.core.model import Snapshot
from bridge.core.ops import Announce, DelService, Op, OpResult, SetDest, SetSysctl, Withdraw
from bridge.core.plan import plan
from bridge.dataplane.shadow import ShadowKernel
from bridge.files.maintenance import Maintenance, clear_maintenance, read_maintenance, write_maintenance
from tests.catalog_builder import health_entry
from tests.harness.shadow_agent import TABLE, Catalog, Flaky, director, director_config, web
from tests.harness.web import CONFIG


def steps(outcome) -> list[str]:
    return [s.description for s in outcome.steps]


def announced(agent: Agent) -> set[str]:
    assert isinstance(agent.reconciler.dataplane, ShadowKernel)
    return agent.reconciler.dataplane.announced


def test_the_first_full_pass_announces_every_served_vip_as_its_last_operations(tmp_path):
    agent = director(tmp_path, Catalog([web(1), web(2)]))
    outcome = agent.sync("start", full=True)
    assert steps(outcome)[-2:] == [Announce(vip, TABLE).describe() for vip in ("198.51.100.2", "198.51.100.3")]
    assert announced(agent) == {"198.51.100.2", "198.51.100.3"} and agent.reconciler.gate.open


def test_a_small_pass_before_any_full_pass_was_applied_announces_nothing(tmp_path):
    source = Catalog([web(1)])
    agent = director(tmp_path, source, Flaky(fails=SetSysctl))
    first = agent.sync("start", full=True)
    assert first.failed and not agent.reconciler.gate.open and announced(agent) == set()
    agent.reconciler.dataplane.fails = None
    source.entries.append(web(2))
    agent.sync("consul: svc-2 changed", full=False)
    assert announced(agent) == set(), "a small pass must not open the gate"
    agent.sync("retry", full=True)
    assert announced(agent) == {"198.51.100.2", "198.51.100.3"}


def test_announcements_are_skipped_when_an_earlier_operation_of_the_pass_failed():
    kernel = Flaky(fails=SetSysctl)
    desired = compute_desired(Catalog([web(1)]).snapshot(), CONFIG, "192.0.2.1")
    outcome, _ = director_pass(desired, CONFIG, kernel, Memory(), apply=True, now=0.0,
                               announce=Announcing(TABLE, desired.vip_routes, True))
    assert [(s.description, s.error) for s in outcome.steps if "announce" in s.description] == [
        (Announce("198.51.100.2", TABLE).describe(), SKIPPED)]
    assert kernel.announced == set() and kernel.services, "the rest of the pass is applied; only the announcement waits"


def test_a_vip_that_loses_its_last_claim_is_withdrawn_first_and_its_service_deleted_after_the_drain(tmp_path):
    source = Catalog([web(1), web(2)])
    agent = director(tmp_path, source)
    agent.sync("start", full=True)
    source.entries.pop()
    gone = agent.sync("resync", full=True)
    assert steps(gone)[0] == Withdraw("198.51.100.3", TABLE).describe()
    kernel = agent.reconciler.dataplane
    assert ("198.51.100.3", 80, "tcp") in kernel.services, "the service drains; it is not deleted yet"
    desired = agent.reconciler.book.desired("192.0.2.1")
    assert agent.state_file.memory is not None
    after = max(agent.state_file.memory.drain_deadlines.values()) + 1
    deleted = plan(desired, kernel.read(), agent.state_file.memory, now=after, drain_timeout=30,
                   announce=Announcing(TABLE, desired.vip_routes, True))
    assert DelService(("198.51.100.3", 80, "tcp")) in deleted.ops
    assert not any(isinstance(op, Withdraw | Announce) for op in deleted.ops), "withdrawn long before"


def test_an_agent_restart_changes_nothing_and_a_failing_first_pass_keeps_what_is_announced(tmp_path):
    source = Catalog([web(1), web(2)])
    first = director(tmp_path, source, Flaky())
    first.sync("start", full=True)
    kernel = first.reconciler.dataplane
    assert isinstance(kernel, Flaky)
    restarted = director(tmp_path, source, kernel)
    assert restarted.sync("start", full=True).steps == ()
    assert kernel.announced == {"198.51.100.2", "198.51.100.3"}
    again = director(tmp_path, source, kernel)
    kernel.fails = SetDest
    source.entries[0] = web(1, "critical")
    failing = again.sync("start", full=True)
    assert failing.failed and not again.reconciler.gate.open
    assert not any("withdraw" in s for s in steps(failing))
    assert kernel.announced == {"198.51.100.2", "198.51.100.3"}, "fail static: the router sees no change"


def test_maintenance_withdraws_every_vip_and_keeps_ipvs_tunnels_and_sysctls(tmp_path):
    source = Catalog([web(1), web(2)])
    agent = director(tmp_path, source)
    agent.sync("start", full=True)
    services = dict(agent.reconciler.dataplane.services)
    links = dict(agent.reconciler.dataplane.links)
    assert agent.config.bgp is not None
    write_maintenance(agent.config.bgp.maintenance_file, Maintenance("kernel upgrade", 1.0, "ops@lb1"))
    agent.watch(agent.reconciler.maintenance_changed)
    outcome = agent.sync(*agent.trigger.take())
    assert steps(outcome) == [Withdraw("198.51.100.2", TABLE).describe(), Withdraw("198.51.100.3", TABLE).describe()]
    assert agent.reconciler.dataplane.services == services and agent.reconciler.dataplane.links == links
    assert agent.sync("resync", full=True).steps == (), "maintenance survives full passes"
    assert clear_maintenance(agent.config.bgp.maintenance_file)
    agent.watch(agent.reconciler.maintenance_changed)
    reason, full = agent.trigger.take()
    assert reason == "maintenance off" and full
    agent.sync(reason, full)
    assert announced(agent) == {"198.51.100.2", "198.51.100.3"}


def test_ipv6_vips_are_announced_withdrawn_and_kept_by_the_same_rules_as_ipv4_ones(tmp_path):
    web6 = health_entry("web6", "b1", "192.0.2.11", 80, ["maglev.vip=[2001:DB8:10::0010]:80/tcp"])
    v6_cidrs = (*CONFIG.vip_cidrs, ipaddress.IPv6Network("2001:db8:10::/64"))
    flaky = Flaky(fails=SetSysctl)
    agent = director(tmp_path, Catalog([web(1), web6]), flaky, encapsulation="gue", tunnel_map=(), vip_cidrs=v6_cidrs)
    agent.sync("start", full=True)
    assert announced(agent) == set(), "not announced before a full pass applied without failures"
    flaky.fails = None
    outcome = agent.sync("resync", full=True)
    assert steps(outcome)[-2:] == [Announce(vip, TABLE).describe() for vip in ("198.51.100.2", "2001:db8:10::10")]
    assert agent.sync("resync", full=True).steps == (), "announced once, kept"
    assert agent.config.bgp is not None
    write_maintenance(agent.config.bgp.maintenance_file, Maintenance("kernel upgrade", 1.0, "ops@lb1"))
    agent.watch(agent.reconciler.maintenance_changed)
    outcome = agent.sync(*agent.trigger.take())
    assert steps(outcome) == [Withdraw(vip, TABLE).describe() for vip in ("198.51.100.2", "2001:db8:10::10")]


def test_health_answers_429_in_maintenance_and_says_why(tmp_path):
    agent = director(tmp_path, Catalog([web(1)]))
    agent.sync("start", full=True)
    server = serve(agent)
    url = f"http://{agent.config.http_address.netloc}/health"
    try:
        assert urllib.request.urlopen(url, timeout=5).status == 200
        assert agent.config.bgp is not None
        write_maintenance(agent.config.bgp.maintenance_file, Maintenance("kernel upgrade", 1.0, "ops@lb1"))
        try:
            urllib.request.urlopen(url, timeout=5)
            raise AssertionError("expected 429")
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
            assert exc.code == 429
        assert body["maintenance"] == {"on": True, "reason": "kernel upgrade", "since": 1.0, "by": "ops@lb1"}
        assert body["announcing"] == {"table": TABLE, "gate": "open"}
    finally:
        server.stop()


def test_a_backend_agent_is_never_in_maintenance_even_with_the_directors_bgp_section(tmp_path):
    """The Nomad job gives both roles one configuration; a backend announces nothing, so its /health must not
    turn to 429 (a warning that holds up a deploy) over a maintenance file on its host."""
    agent = Agent(BackendReconciler(replace(director_config(tmp_path), role="backend")), Catalog([web(1)]))  # type: ignore[arg-type]
    assert agent.config.bgp is not None
    write_maintenance(agent.config.bgp.maintenance_file, Maintenance("kernel upgrade", 1.0, "ops@lb1"))
    state = agent.health()
    assert state["maintenance"] == {"on": False} and state["announcing"] is None


def test_a_maintenance_file_is_on_whatever_its_content(tmp_path):
    path = tmp_path / "maintenance"
    assert read_maintenance(path) is None
    path.write_text("upgrading, ask Ana\n")
    found = read_maintenance(path)
    assert found is not None and found.reason == "upgrading, ask Ana"


def test_sysctl_drift_is_repaired_and_unlisted_sysctls_are_never_touched():
    state = compute_desired(Snapshot(()), replace(CONFIG, sysctls=(("net.ipv4.vs.sloppy_tcp", 1),)), "192.0.2.1")
    drifted = LiveState(sysctls=(("net.ipv4.vs.sloppy_tcp", 0), ("net.ipv4.vs.conntrack", 1)))
    assert plan(state, drifted, Memory(), 0.0, 30).ops == (SetSysctl("net.ipv4.vs.sloppy_tcp", 1, 0),)
    right = LiveState(sysctls=(("net.ipv4.vs.sloppy_tcp", 1), ("net.ipv4.vs.conntrack", 1)))
    assert plan(state, right, Memory(), 0.0, 30).ops == ()


def test_without_a_bgp_section_the_announce_table_is_never_touched(tmp_path):
    agent = director(tmp_path, Catalog([web(1)]), ShadowKernel(LiveState(announced=("198.51.100.9",))), bgp=None)
    outcome = agent.sync("start", full=True)
    assert not any("announce" in s or "withdraw" in s for s in steps(outcome))
    assert announced(agent) == {"198.51.100.9"}


def test_the_maintenance_command_works_without_a_running_agent(tmp_path, capsys):
    from bridge.cli.main import main

    config = tmp_path / "config.yaml"
    config.write_text(f"http_bind: 127.0.0.1:1\nbgp:\n  maintenance_file: {tmp_path / 'm'}\n  table: 251\n")
    assert main(["maintenance", "on", "--reason", "rack move", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "maintenance on: withdrew 0 VIP(s)" in out and "no agent answers on 127.0.0.1:1" in out
    found = read_maintenance(tmp_path / "m")
    assert found is not None and found.reason == "rack move"
    assert main(["maintenance", "status", "--config", str(config)]) == 0
    assert "maintenance: on (rack move, since " in capsys.readouterr().out
    assert main(["maintenance", "off", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith("maintenance off")
    assert read_maintenance(tmp_path / "m") is None


def test_sync_daemons_are_started_restarted_on_a_change_and_left_alone_without_conn_sync():
    from bridge.core.config import ConnSyncConfig
    from bridge.core.model import SyncDaemon
    from bridge.core.ops import StartSyncDaemon, StopSyncDaemon

    config = replace(CONFIG, sysctls=(), conn_sync=ConnSyncConfig("eth0", 7))
    state = compute_desired(Snapshot(()), config, "192.0.2.1")
    master, backup = SyncDaemon("master", "eth0", 7), SyncDaemon("backup", "eth0", 7)
    assert plan(state, LiveState(), Memory(), 0.0, 30).ops == (StartSyncDaemon(master), StartSyncDaemon(backup))
    old = SyncDaemon("master", "eth1", 7)
    assert plan(state, LiveState(sync_daemons=(old, backup)), Memory(), 0.0, 30).ops == (
        StopSyncDaemon(old), StartSyncDaemon(master))
    unowned = compute_desired(Snapshot(()), replace(config, conn_sync=None), "192.0.2.1")
    assert plan(unowned, LiveState(sync_daemons=(old,)), Memory(), 0.0, 30).ops == ()


def test_a_pass_whose_operations_keep_failing_is_retried_with_the_pass_failures_backoff(tmp_path):
    """Not a full pass every 5 s forever: the same 5 s doubling to 5 min as a pass that raised."""
    class Refusing(ShadowKernel):
        def apply(self, ops: Iterable[Op]) -> Iterator[OpResult]:
            for op in ops:
                yield OpResult(op, "EPERM") if isinstance(op, SetSysctl) else next(super().apply([op]))

    agent = director(tmp_path, Catalog([web(1)]), Refusing())

    def retry_in() -> float:
        job = agent.scheduler.get_job("retry")
        return (job.trigger.run_date.timestamp() - time.time()) if job else 0.0

    delays = []
    agent.scheduler.start()
    try:
        for _ in range(3):
            agent.sync("retry", full=True)
            delays.append(retry_in())
        agent.reconciler.dataplane = ShadowKernel(agent.reconciler.dataplane.read())  # type: ignore[union-attr]
        agent.sync("retry", full=True)
        agent.reconciler.dataplane = Refusing(replace(agent.reconciler.dataplane.read(), sysctls=()))
        agent.sync("sysctl changed by hand", full=True)
        delays.append(retry_in())
    finally:
        agent.scheduler.shutdown(wait=False)
    assert [round(d) for d in delays] == [5, 10, 20, 5], "a pass without failures starts the backoff again"


def test_withdrawing_a_route_already_gone_is_done_not_failed():
    """`maintenance on` deletes the announcements itself; a small pass planned from the cached announce table
    then withdraws routes already gone, which is what it wanted, not a failure that holds up the next pass.
    The model agrees with the kernel (Kernel._flush takes ESRCH of a withdrawal as done)."""
    kernel = ShadowKernel(LiveState(announced=("198.51.100.2",)))
    kernel.announced.clear()  # what `maintenance on` did, behind the pass's back
    results = list(kernel.apply([Withdraw("198.51.100.2", TABLE)]))
    assert [r.error for r in results] == [None] and kernel.announced == set()
