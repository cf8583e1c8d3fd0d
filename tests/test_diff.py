from __future__ import annotations

import random
from dataclasses import replace

from bridge.core.keys import DestKey, ServiceKey
from bridge.core.memory import Memory
from bridge.core.ops import (
    AddDest,
    AddLink,
    AddRoute,
    AddService,
    DelDest,
    DelLink,
    DelRoute,
    DelService,
    SetDest,
    SetSysctl,
)
from bridge.core.plan import plan
from tests.harness.fake_kernel import FakeDirector
from tests.harness.web import CONFIG, KEY, entry, random_history


def order(director):
    return [address for address, _, _ in director.dests(KEY)]


def test_first_apply_builds_everything_in_order_and_second_is_a_no_op():
    d = FakeDirector(CONFIG)
    p = d.sync([entry(11), entry(12), entry(13)])
    kinds = [type(op) for op in p.ops]
    assert kinds == [SetSysctl] * 2 + [AddLink] * 3 + [AddRoute] * 4 + [AddService] + [AddDest] * 3
    assert order(d) == ["203.0.113.13", "203.0.113.12", "203.0.113.11"]
    assert d.sync([entry(11), entry(12), entry(13)]).ops == ()


def test_one_instance_going_critical_is_one_operation():
    d = FakeDirector(CONFIG)
    d.sync([entry(11), entry(12)])
    p = d.sync([entry(11, status="critical"), entry(12)])
    assert p.ops == (SetDest(KEY, "203.0.113.11", 80, 0),)
    assert d.sync([entry(11), entry(12)]).ops == (SetDest(KEY, "203.0.113.11", 80, 1),)


def test_new_newest_backend_is_one_add_at_the_head_plus_its_tunnel():
    d = FakeDirector(CONFIG)
    d.sync([entry(11), entry(12)])
    p = d.sync([entry(11), entry(12), entry(13)])
    assert [op for op in p.ops if isinstance(op, AddDest | SetDest | DelDest)] == [AddDest(KEY, "203.0.113.13", 80, 1)]
    assert order(d)[0] == "203.0.113.13"


def test_critical_backend_is_added_with_its_tagged_weight_then_set_to_zero():
    d = FakeDirector(CONFIG)
    p = d.sync([entry(11, status="critical", weight=5)])
    assert [op for op in p.ops if isinstance(op, AddDest | SetDest)] == [
        AddDest(KEY, "203.0.113.11", 80, 5), SetDest(KEY, "203.0.113.11", 80, 0)]


def test_backend_inserted_in_the_middle_re_adds_only_those_in_front_of_it():
    d = FakeDirector(CONFIG)
    d.sync([entry(11, index=10), entry(12, index=30), entry(13, index=40)])
    p = d.sync([entry(11, index=10), entry(12, index=30), entry(13, index=40), entry(14, index=20)])
    dest_ops = [op for op in p.ops if isinstance(op, AddDest | DelDest)]
    assert dest_ops == [
        DelDest(KEY, "203.0.113.13", 80), DelDest(KEY, "203.0.113.12", 80),
        AddDest(KEY, "203.0.113.14", 80, 1), AddDest(KEY, "203.0.113.12", 80, 1), AddDest(KEY, "203.0.113.13", 80, 1),
    ]
    assert order(d) == ["203.0.113.13", "203.0.113.12", "203.0.113.14", "203.0.113.11"]


def test_deregistered_backend_drains_at_weight_zero_then_is_deleted_at_its_deadline():
    d = FakeDirector(CONFIG)
    d.sync([entry(11), entry(12)], now=0)
    p = d.sync([entry(12)], now=100)
    assert p.ops == (SetDest(KEY, "203.0.113.11", 80, 0),)
    assert d.sync([entry(12)], now=129).ops == ()
    p = d.sync([entry(12)], now=130)
    assert p.ops == (DelDest(KEY, "203.0.113.11", 80), DelRoute("203.0.113.11", "main", "mglc000020b"),
                     DelLink("mglc000020b"))
    assert d.sync([entry(12)], now=131).ops == ()
    assert d.memory.drain_deadlines == {}


def test_backend_returning_during_drain_is_restored_in_place():
    d = FakeDirector(CONFIG)
    d.sync([entry(11), entry(12)], now=0)
    d.sync([entry(12)], now=10)
    assert d.sync([entry(11), entry(12)], now=20).ops == (SetDest(KEY, "203.0.113.11", 80, 1),)
    assert d.memory.drain_deadlines == {}


def test_virtual_service_losing_its_last_claim_is_drained_before_deletion():
    d = FakeDirector(CONFIG)
    d.sync([entry(11)], now=0)
    p = d.sync([], now=1)
    assert p.ops == (SetDest(KEY, "203.0.113.11", 80, 0),)
    p = d.sync([], now=31)
    assert p.ops == (DelService(KEY), DelRoute("198.51.100.10", "local", "lo"),
                     DelRoute("203.0.113.11", "main", "mglc000020b"), DelLink("mglc000020b"))
    assert d.kernel.read().services == ()


def test_tagged_weight_zero_after_serving_needs_a_fresh_add_to_forget_its_slots():
    d = FakeDirector(CONFIG)
    d.sync([entry(11, index=1), entry(12, index=2)])
    p = d.sync([entry(11, index=1, weight=0), entry(12, index=2)])
    dest_ops = [op for op in p.ops if isinstance(op, AddDest | DelDest | SetDest)]
    assert dest_ops == [DelDest(KEY, "203.0.113.11", 80), DelDest(KEY, "203.0.113.12", 80),
                        AddDest(KEY, "203.0.113.11", 80, 0), AddDest(KEY, "203.0.113.12", 80, 1)]


def test_directors_with_different_histories_converge_to_identical_lists_and_remembered_weights():
    for seed in range(30):
        history = random_history(random.Random(seed))
        final = history[-1]
        watcher, restarted, late = FakeDirector(CONFIG), FakeDirector(CONFIG), FakeDirector(CONFIG)
        for t, entries in enumerate(history):
            watcher.sync(entries, now=t)
            if t % 3 == 0:
                restarted.sync(entries, now=t)
            if t == len(history) // 2:
                restarted = replace_kernel_keep_memory(restarted)
        end = len(history) + CONFIG.drain_timeout + 1
        for d in (watcher, restarted, late):
            d.sync(final, now=end)
            d.sync(final, now=end + 1)
        assert watcher.kernel.table_state() == late.kernel.table_state(), seed
        assert restarted.kernel.table_state() == late.kernel.table_state(), seed
        assert watcher.sync(final, now=end + 2).ops == ()


def replace_kernel_keep_memory(director):
    """An agent restart: the kernel and the state file survive, the process does not."""
    fresh = FakeDirector(CONFIG)
    fresh.kernel = director.kernel
    fresh.memory = replace(director.memory)
    return fresh


def test_a_director_that_lost_its_state_file_never_assumes_what_the_kernel_remembers():
    d = FakeDirector(CONFIG)
    d.sync([entry(11, index=1, weight=2), entry(12, index=2)])
    d.sync([entry(11, index=1, weight=2, status="critical"), entry(12, index=2)])
    d.memory = Memory()  # the state file is gone; the kernel still remembers weight 2 for .11
    p = d.sync([entry(11, index=1, weight=5, status="critical"), entry(12, index=2)])
    assert p.ops == (SetDest(KEY, "203.0.113.11", 80, 5), SetDest(KEY, "203.0.113.11", 80, 0))
    d.memory = Memory()
    p = d.sync([entry(11, index=1, weight=0), entry(12, index=2)])
    assert [type(op) for op in p.ops if isinstance(op, AddDest | DelDest)] == [DelDest, DelDest, AddDest, AddDest]
    fresh = FakeDirector(CONFIG)
    fresh.sync([entry(11, index=1, weight=0), entry(12, index=2)])
    assert d.kernel.table_state() == fresh.kernel.table_state()


OTHER_VIP = "maglev.vip=198.51.100.20:80"
OTHER_KEY = ServiceKey("198.51.100.20", 80, "tcp")


def test_scoped_plan_of_one_health_change_is_the_full_plan_of_that_change():
    d = FakeDirector(CONFIG)
    entries = [entry(11), entry(12), entry(21, vip=OTHER_VIP), entry(22, vip=OTHER_VIP)]
    d.sync(entries)
    entries[0] = entry(11, status="critical")
    desired = d.desired(entries)
    live = d.kernel.read()
    full = plan(desired, live, d.memory, 1.0, CONFIG.drain_timeout)
    scoped = plan(desired, d.kernel.read(frozenset({KEY})), d.memory, 1.0, CONFIG.drain_timeout, frozenset({KEY}))
    assert scoped.ops == full.ops == (SetDest(KEY, "203.0.113.11", 80, 0),)


def test_scoped_plan_keeps_deadlines_outside_its_scope_and_deletes_no_link_or_route():
    d = FakeDirector(CONFIG)
    d.sync([entry(11), entry(21, vip=OTHER_VIP), entry(22, vip=OTHER_VIP)], now=0.0)
    d.sync([entry(11), entry(21, vip=OTHER_VIP)], now=1.0)  # 22 drains until 31
    assert set(d.memory.drain_deadlines) == {DestKey.parse("198.51.100.20:80/tcp>203.0.113.22:80")}
    desired = d.desired([entry(11, status="critical"), entry(21, vip=OTHER_VIP)])
    scoped = plan(desired, d.kernel.read(frozenset({KEY})), d.memory, 100.0, CONFIG.drain_timeout, frozenset({KEY}))
    assert scoped.ops == (SetDest(KEY, "203.0.113.11", 80, 0),)
    assert scoped.drain_deadlines == d.memory.drain_deadlines  # past due, but not this pass's to delete
    full = plan(desired, d.kernel.read(), d.memory, 100.0, CONFIG.drain_timeout)
    assert DelDest(OTHER_KEY, "203.0.113.22", 80) in full.ops
    assert any(isinstance(op, DelLink) for op in full.ops)


def kernel_memory_at_weight_zero(kernel):
    """What the kernel remembers and cannot report: the last weights of its real servers at weight 0."""
    return {DestKey(key, rs.address, rs.port): kernel.last_weight[DestKey(key, rs.address, rs.port)]
            for key, service in kernel.services.items() for rs in service.real_servers if rs.weight == 0}


def test_the_memory_holds_exactly_what_the_kernel_remembers_for_its_real_servers_at_weight_zero():
    for seed in range(30):
        rng = random.Random(seed)
        d = FakeDirector(CONFIG)
        for t, entries in enumerate(random_history(rng)):
            d.sync(entries, now=t, scope=rng.choice([None, frozenset({KEY})]))
            assert d.memory.last_weights == kernel_memory_at_weight_zero(d.kernel), (seed, t)


def test_an_edit_to_weight_zero_remembers_the_weight_the_real_server_had_before_it():
    d = FakeDirector(CONFIG)
    d.sync([entry(11, weight=2), entry(12)])
    assert d.memory.last_weights == {}, "serving real servers: the kernel reports their weights"
    d.sync([entry(11, weight=2, status="critical"), entry(12)])
    assert d.memory.last_weights == {DestKey(KEY, "203.0.113.11", 80): 2}
    p = d.sync([entry(11, weight=5, status="critical"), entry(12)])
    assert p.ops == (SetDest(KEY, "203.0.113.11", 80, 5), SetDest(KEY, "203.0.113.11", 80, 0))
    assert d.memory.last_weights == {DestKey(KEY, "203.0.113.11", 80): 5}
    d.sync([entry(11, weight=5), entry(12)])
    assert d.memory.last_weights == {}


def test_a_state_file_that_remembers_every_real_server_plans_the_same_and_the_next_pass_trims_it():
    entries = [entry(11, weight=2), entry(12, weight=3, status="critical"), entry(13), entry(21, vip=OTHER_VIP)]
    d = FakeDirector(CONFIG)
    d.sync(entries)
    every = dict(d.kernel.last_weight)  # what state files held before: every real server's weight
    assert len(every) == 4 and d.memory.last_weights == {DestKey(KEY, "203.0.113.12", 80): 3}
    entries[0] = entry(11, weight=2, status="critical")
    desired = d.desired(entries)
    old_file = Memory(d.memory.drain_deadlines, every)
    assert plan(desired, d.kernel.read(), old_file, 1.0, CONFIG.drain_timeout) == plan(
        desired, d.kernel.read(), d.memory, 1.0, CONFIG.drain_timeout)
    d.memory = old_file
    d.sync(entries, now=1.0, scope=frozenset({KEY}))
    assert d.memory.last_weights == {**kernel_memory_at_weight_zero(d.kernel),
                                     DestKey(OTHER_KEY, "203.0.113.21", 80): 1}, "a service it did not read: kept"
    d.sync(entries, now=2.0)
    assert d.memory.last_weights == kernel_memory_at_weight_zero(d.kernel)


def test_remembered_weights_stay_the_same_mapping_when_no_real_server_at_weight_zero_changes():
    d = FakeDirector(CONFIG)
    d.sync([entry(11), entry(12)])
    d.sync([entry(11, status="critical"), entry(12)])
    weights = d.memory.last_weights
    d.sync([entry(11, status="critical"), entry(12, weight=3)])
    assert d.memory.last_weights is weights, "an edit of a serving real server: nothing to remember"
    d.sync([entry(11), entry(12, weight=3)])
    assert d.memory.last_weights == {}
