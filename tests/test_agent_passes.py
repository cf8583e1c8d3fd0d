"""The agent's passes in shadow mode (a model of the kernel): a catalog change costs a small pass over the
virtual services it touched; full passes (start, re-sync) plan everything and find nothing left to do."""

from __future__ import annotations

from bridge.core.keys import DestKey, ServiceKey
from bridge.core.model import Snapshot
from bridge.core.ops import SetDest
from bridge.files.store import load_state
from tests.harness.shadow_agent import Catalog, shadow_agent, web


def test_one_health_change_is_a_small_pass_with_one_operation(tmp_path):
    source = Catalog([web(n) for n in range(20)])
    agent = shadow_agent(tmp_path, source)
    first = agent.sync("start", full=True)
    assert first is not None and len(first.steps) == 2 + 20 * 2 + 20 * 3  # sysctls, services + dests, links, routes
    source.entries[7] = web(7, "critical")
    small = agent.sync("consul: svc-7 changed", full=False)
    assert small is not None and [s.description for s in small.steps] == [
        SetDest(ServiceKey("198.51.100.8", 80, "tcp"), "203.0.113.17", 80, 0).describe()]
    assert not small.applied, "shadow mode never claims to have applied anything"
    last = agent.health()["last_pass"]
    assert (last["scope"], last["operations"], last["reason"]) == ("1 virtual service(s)", 1, "consul: svc-7 changed")
    assert agent.sync("resync", full=True).steps == ()
    assert agent.sync("consul: nothing new", full=False).steps == ()
    agent.close_dataplane()


def test_the_agent_keeps_its_memory_in_the_state_file_after_each_pass(tmp_path):
    source = Catalog([web(1), web(2)])
    agent = shadow_agent(tmp_path, source)
    agent.sync("start", full=True)
    source.entries.pop()
    agent.sync("consul: svc-2 changed", full=False)
    stored = load_state(tmp_path / "state.json")
    assert list(stored.memory.drain_deadlines) == [ServiceKey.parse("198.51.100.3:80/tcp"),
                                                   DestKey.parse("198.51.100.3:80/tcp>203.0.113.12:80")]
    assert stored.memory.last_weights == {DestKey.parse("198.51.100.3:80/tcp>203.0.113.12:80"): 1}, (
        "only the real server at weight 0: the kernel reports the others' weights")
    assert [op["description"] for op in stored.report["operations"]] == [
        "set real server 203.0.113.12:80 weight 0 in 198.51.100.3:80/tcp"]
    agent.close_dataplane()


class Unavailable(Catalog):
    def __init__(self) -> None:
        super().__init__([web(1)])
        self.ready = False

    def snapshot(self) -> Snapshot:
        if not self.ready:
            from bridge.catalog.source import CatalogUnavailable

            raise CatalogUnavailable("waiting for the first answer")
        return super().snapshot()


def test_a_pass_without_a_catalog_leaves_its_full_request_pending(tmp_path):
    source = Unavailable()
    agent = shadow_agent(tmp_path, source)
    agent.trigger.request("start")
    assert agent.sync(*agent.trigger.take()) is None
    source.ready = True
    agent.trigger.request("consul: svc-1 changed", full=False)
    assert agent.trigger.take() == ("start, consul: svc-1 changed", True)
