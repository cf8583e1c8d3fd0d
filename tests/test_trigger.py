"""How requests for a pass merge (bridge/agent/trigger.py): the rules of when the agent makes a pass and
what kind, on the trigger alone."""

from __future__ import annotations

import threading

from bridge.agent.trigger import Request, Trigger
from tests.harness.shadow_agent import Catalog, shadow_agent, web


def taken_once(trigger: Trigger) -> Trigger:
    """A trigger whose first (always full) request has been taken, as after the agent's start pass."""
    trigger.take()
    return trigger


def test_the_first_pass_is_full_whatever_asks_for_it():
    trigger = Trigger()
    trigger.request("consul: web changed", full=False)
    assert trigger.take() == Request("consul: web changed", True)


def test_a_catalog_change_alone_is_a_scoped_pass():
    trigger = taken_once(Trigger())
    trigger.request("consul: web changed", full=False)
    assert trigger.take() == Request("consul: web changed", False)


def test_a_full_request_beats_scoped_ones_in_either_order():
    for first, second in ((False, True), (True, False)):
        trigger = taken_once(Trigger())
        trigger.request("a", full=first)
        trigger.request("b", full=second)
        assert trigger.take().full


def test_reasons_are_kept_in_order_each_once():
    trigger = taken_once(Trigger())
    for reason in ("consul: web changed", "resync", "consul: web changed", "drain deadline"):
        trigger.request(reason, full=reason != "consul: web changed")
    assert trigger.take() == Request("consul: web changed, resync, drain deadline", True)


def test_taking_empties_the_trigger():
    trigger = taken_once(Trigger())
    trigger.request("resync")
    trigger.take()
    assert trigger.take() == Request("request", False), "nothing asked for since: a scoped pass of nothing"


def test_a_pass_that_could_not_run_carries_its_request_over_in_front_and_full_stays_full():
    trigger = Trigger()
    trigger.request("start")
    start = trigger.take()
    trigger.carry_over(start)
    trigger.request("consul: web changed", full=False)
    assert trigger.take() == Request("start, consul: web changed", True)


def test_a_carried_over_scoped_request_stays_scoped():
    trigger = taken_once(Trigger())
    trigger.request("consul: web changed", full=False)
    trigger.carry_over(trigger.take())
    trigger.request("consul: api changed", full=False)
    assert trigger.take() == Request("consul: web changed, consul: api changed", False)


def test_wanting_a_full_pass_makes_the_next_one_full_without_waking_the_worker():
    trigger = taken_once(Trigger())
    trigger.want_full()
    assert not trigger.wait(0), "no pass is asked for"
    trigger.request("consul: web changed", full=False)
    assert trigger.take() == Request("consul: web changed", True)


def test_requests_during_a_pass_are_one_more_wake_up():
    trigger = Trigger()
    for n in range(5):
        trigger.request(f"consul: svc-{n} changed", full=False)
    assert trigger.wait(0)
    assert not trigger.wait(0), "five requests, one wake-up"
    assert trigger.take().reason == ", ".join(f"consul: svc-{n} changed" for n in range(5))


def test_a_request_from_another_thread_wakes_the_waiting_worker():
    trigger = Trigger()
    woken = threading.Event()

    def worker() -> None:
        if trigger.wait(60):
            woken.set()

    thread = threading.Thread(target=worker)
    thread.start()
    trigger.request("resync")
    thread.join(60)
    assert woken.is_set()


def test_a_wake_up_asks_for_no_pass():
    """Stopping and SIGHUP's reload wake the worker; they add no reason of their own."""
    trigger = taken_once(Trigger())
    trigger.wake()
    assert trigger.wait(0)
    assert trigger.take() == Request("request", False)


def test_merged_catalog_changes_are_one_scoped_pass_over_the_union_of_what_changed(tmp_path):
    """A scoped request names no services: the director's pass covers what its desired state says changed
    since the last applied pass, so two changes merged into one pass cover both services."""
    source = Catalog([web(n) for n in range(4)])
    agent = shadow_agent(tmp_path, source)
    agent.sync(*agent.trigger.take())
    source.entries[1] = web(1, "critical")
    agent.trigger.request("consul: svc-1 changed", full=False)
    source.entries[2] = web(2, "critical")
    agent.trigger.request("consul: svc-2 changed", full=False)
    outcome = agent.sync(*agent.trigger.take())
    assert outcome is not None and [s.description for s in outcome.steps] == [
        "set real server 203.0.113.11:80 weight 0 in 198.51.100.2:80/tcp",
        "set real server 203.0.113.12:80 weight 0 in 198.51.100.3:80/tcp"]
    last = agent.health()["last_pass"]
    assert (last["reason"], last["scope"]) == ("consul: svc-1 changed, consul: svc-2 changed", "2 virtual service(s)")
    agent.close_dataplane()
