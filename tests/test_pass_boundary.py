"""The agent never dies of data: an exception in any stage of a pass is caught at the pass boundary, counted
and shown in /health's state, the kernel keeps what it has, and the next pass works."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

import bridge.agent.reconcile
import bridge.agent.state_file
import bridge.core.desired
from bridge.catalog.consul_format import snapshot_from_services
from bridge.core.desired import DesiredBook
from bridge.core.model import Snapshot
from bridge.core.outcome import PassOutcome
from bridge.core.tags import TagParser
from bridge.dataplane.backend import BackendLive
from bridge.dataplane.shadow import ShadowKernel
from tests.catalog_builder import catalog, health_entry
from tests.harness.shadow_agent import Catalog, shadow_agent, web
from tests.harness.wait import wait_until
from tests.harness.web import CONFIG


class Boom(RuntimeError):
    pass


def boom(*_args, **_kwargs):
    raise Boom("injected")


STAGES = {
    "catalog snapshot": (Catalog, "snapshot"),
    "desired state": (DesiredBook, "desired"),
    "plan and apply": (bridge.agent.reconcile, "plan"),
    "apply": (ShadowKernel, "apply"),
    "state save": (bridge.agent.state_file, "save_state"),
    "report": (PassOutcome, "report"),
}


EXPECTED_STAGE = {"apply": "plan and apply", "report": "state save"}


def weights(agent) -> dict[str, int]:
    """What the (model) kernel holds: each VIP's one real server's weight."""
    return {s.vip: s.real_servers[0].weight for s in agent.reconciler.dataplane.read(None).services}


@pytest.mark.parametrize("stage", list(STAGES))
def test_an_exception_in_any_stage_is_counted_shown_and_the_agent_goes_on(tmp_path, monkeypatch, stage):
    source = Catalog([web(n) for n in range(3)])
    agent = shadow_agent(tmp_path, source)
    worker = threading.Thread(target=agent.work, daemon=True)
    worker.start()
    try:
        agent.sync("start")
        with monkeypatch.context() as patch:
            patch.setattr(*STAGES[stage], boom)
            source.entries[1] = web(1, "critical")
            agent.trigger.request("consul: svc-1 changed", full=False)
            state = wait_until(lambda: agent.health()["errors"]["last"] and agent.health())
        assert worker.is_alive()
        assert state["degraded"] and state["errors"]["passes_failed"] == 1
        assert "Boom: injected" in state["errors"]["last"]["error"]
        assert state["errors"]["last"]["stage"] == EXPECTED_STAGE.get(stage, stage)
        agent.trigger.request("retry")
        wait_until(lambda: not agent.health()["degraded"])
        assert weights(agent) == {"198.51.100.1": 1, "198.51.100.2": 0, "198.51.100.3": 1}, "the change is applied"
    finally:
        agent._stopping.set()
        agent.trigger.wake()
        worker.join(10)
    assert not worker.is_alive()


def break_parsing_of(monkeypatch, service: str) -> None:
    """Tag parsing raises (as a bug would) for one service's instances only."""
    real_parse = TagParser.parse

    def parse(self, instance):
        if instance.service == service:
            raise Boom(f"injected in {service}")
        return real_parse(self, instance)

    monkeypatch.setattr(TagParser, "parse", parse)


def test_a_service_whose_desired_state_cannot_be_computed_keeps_its_kernel_state(tmp_path, monkeypatch):
    source = Catalog([web(n) for n in range(3)])
    agent = shadow_agent(tmp_path, source)
    agent.sync("start")
    real_parse = TagParser.parse
    break_parsing_of(monkeypatch, "svc-1")
    source.entries[1] = web(1, "critical")
    source.entries[2] = web(2, "critical")
    outcome = agent.sync("consul: svc-1, svc-2 changed", full=False)
    assert outcome is not None
    assert [s.description for s in outcome.steps] == [
        "set real server 203.0.113.12:80 weight 0 in 198.51.100.3:80/tcp"], "svc-1 keeps its kernel state"
    state = agent.health()
    assert state["degraded"] and state["errors"]["services"] == {"svc-1": "Boom: injected in svc-1"}
    assert agent.sync("resync").steps == (), "a full pass keeps svc-1's last desired state, too"
    monkeypatch.setattr(TagParser, "parse", real_parse)
    assert [s.description for s in agent.sync("consul: svc-1 changed", full=False).steps] == [
        "set real server 203.0.113.11:80 weight 0 in 198.51.100.2:80/tcp"]
    assert not agent.health()["degraded"] and agent.health()["errors"]["services"] == {}
    agent.close_dataplane()


def test_a_service_never_computed_is_not_withdrawn_by_a_full_pass(tmp_path, monkeypatch):
    source = Catalog([web(n) for n in range(3)])
    agent = shadow_agent(tmp_path, source)
    agent.sync("start")
    restarted = shadow_agent(tmp_path, source)
    restarted.reconciler.dataplane = agent.reconciler.dataplane  # the same (model) kernel, as after a restart
    real_part = DesiredBook._part

    def broken_for_svc_2(self, instances):
        if instances[0].service == "svc-2":
            raise Boom("injected")
        return real_part(self, instances)

    monkeypatch.setattr(DesiredBook, "_part", broken_for_svc_2)
    outcome = restarted.sync("start")
    assert outcome is not None and outcome.steps == (), "svc-2's virtual service and tunnel stay"
    assert restarted.health()["errors"]["services"] == {"svc-2": "Boom: injected"}
    agent.close_dataplane()


def test_an_unexpected_snapshot_is_one_failed_pass_not_a_dead_worker(tmp_path):
    class Broken(Catalog):
        def snapshot(self) -> Snapshot:
            raise KeyError("no such thing")

    agent = shadow_agent(tmp_path, Broken([]))
    assert agent.sync("start") is None
    assert agent.health()["errors"]["last"]["stage"] == "catalog snapshot"
    assert agent.health()["last_error"].startswith("pass failed in catalog snapshot: KeyError")


class FakeBackendKernel:
    """This node's kernel as the backend role reads it: two VIPs on lo, everything else in place."""

    def __init__(self, _config) -> None:
        pass

    def read(self):
        return BackendLive(("198.51.100.1", "198.51.100.9"), {5555: "ipip"}, True,
                           {"all/arp_ignore": 1, "all/arp_announce": 2})

    def close(self) -> None:
        pass


def test_the_backend_role_keeps_its_vips_when_a_service_on_it_cannot_be_computed(monkeypatch):
    config = replace(CONFIG, node_name="b1")
    snap = snapshot_from_services(catalog(
        health_entry("svc-0", "b1", "192.0.2.10", 80, ["maglev.vip=198.51.100.1:80"]),
        health_entry("svc-2", "b1", "192.0.2.10", 80, ["maglev.vip=198.51.100.3:80"]),
    ))
    monkeypatch.setattr(bridge.agent.reconcile, "BackendKernel", FakeBackendKernel)
    plain = bridge.agent.reconcile.backend_pass(snap, config, dry_run=True, now=0.0)
    assert [s.description for s in plain.steps] == ["add vip 198.51.100.3", "delete vip 198.51.100.9"]
    break_parsing_of(monkeypatch, "svc-2")
    kept = bridge.agent.reconcile.backend_pass(snap, config, dry_run=True, now=0.0)
    assert kept.steps == (), "nothing is deleted while a service's claims are unknown"
    assert kept.failures == (("svc-2", "Boom: injected in svc-2"),)
    assert kept.notes == (
        "service svc-2: claims could not be computed (Boom: injected in svc-2); this node keeps its VIPs",)
