"""Standby real servers (`standby_encapsulation: gue` on a `fou` director), without a kernel: the configuration,
the desired state, the planner against the fake kernel (which follows the kernel's last-weight rule on its own),
the Maglev table they leave alone, and what `plan` and `status` say. The migration runbook's step 1
(docs/gue-migration.md); tests/kernel/test_gue_migration.py proves it on the kernel."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from bridge.catalog.consul_format import snapshot_from_services
from bridge.core.config import ConfigError, parse_config
from bridge.core.desired import compute_desired
from bridge.core.encap import DIRECT_ROUTING
from bridge.core.ops import AddDest, DelDest, SetDest
from bridge.inspect.status import service_fingerprints, standby_servers
from bridge.inspect.text import desired_text, status_json, status_text
from tests.catalog_builder import catalog
from tests.harness.fake_kernel import FakeDirector
from tests.harness.web import CONFIG, GUE, GUE_6080, KEY, entry, random_history

STANDBY = replace(CONFIG, standby_encapsulation="gue")
SWITCHED = replace(GUE, standby_encapsulation=None)


def fingerprints(d: FakeDirector) -> dict:
    return service_fingerprints(d.kernel.read().services, d.memory.last_weights, 4093)


# ---- configuration ---------------------------------------------------------------------------------------

def test_a_fou_director_takes_gue_standby_real_servers_with_the_gue_settings():
    config = parse_config({"standby_encapsulation": "gue", "gue_port": 6081, "gue_checksum": "csum"})
    assert config.encapsulation == "fou" and config.forwarding == DIRECT_ROUTING
    assert config.standby_forwarding == replace(GUE_6080, port=6081, checksum="csum")
    assert parse_config({}).standby_forwarding is None


@pytest.mark.parametrize("raw, expected", [
    ({"encapsulation": "gue", "standby_encapsulation": "gue"}, "standby_encapsulation: gue is also encapsulation"),
    ({"standby_encapsulation": "fou"}, "standby_encapsulation: fou is also encapsulation"),
    ({"encapsulation": "gue", "standby_encapsulation": "fou"}, "standby_encapsulation: fou is not supported"),
    ({"standby_encapsulation": "ipip"}, "standby_encapsulation: expected one of ['fou', 'gue'], got 'ipip'"),
])
def test_a_standby_of_the_directors_own_or_an_unsupported_encapsulation_is_refused_by_name(raw, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        parse_config(raw)


# ---- desired state -----------------------------------------------------------------------------------------

def test_every_backend_gets_a_standby_real_server_at_weight_0_in_front_of_the_directors_own():
    """Critical backends too: a standby is where a peer's synchronised connections to that backend bind."""
    desired = compute_desired(snapshot_from_services(catalog(entry(11), entry(12, status="critical"))), STANDBY,
                              "192.0.2.1")
    servers = [(r.address, r.weight, r.last_weight, r.standby) for r in desired.virtual_services[0].real_servers]
    assert servers == [("192.0.2.12", 0, 0, GUE_6080), ("192.0.2.11", 0, 0, GUE_6080),
                       ("203.0.113.12", 0, 1, None), ("203.0.113.11", 1, 1, None)]
    plain = compute_desired(snapshot_from_services(catalog(entry(11), entry(12, status="critical"))), CONFIG,
                            "192.0.2.1")
    assert desired.tunnels == plain.tunnels, "a standby needs no link and no route"
    assert "-> 192.0.2.12:80  weight 0 standby via gue port 6080 (no slot)" in desired_text(desired)


# ---- the planner -------------------------------------------------------------------------------------------

def test_the_key_adds_the_standby_real_servers_at_weight_0_and_the_table_stays_as_it_was():
    d = FakeDirector(CONFIG)
    d.sync([entry(11), entry(12)])
    before = fingerprints(d)
    d.config = STANDBY
    p = d.sync([entry(11), entry(12)])
    assert p.ops == (AddDest(KEY, "192.0.2.11", 80, 0, GUE_6080, True),
                     AddDest(KEY, "192.0.2.12", 80, 0, GUE_6080, True))
    assert "add real server 192.0.2.11:80 weight 0 via gue port 6080 (standby) in" in p.ops[0].describe()
    assert d.dests(KEY) == [("192.0.2.12", 0, GUE_6080), ("192.0.2.11", 0, GUE_6080),
                         ("203.0.113.12", 1, DIRECT_ROUTING), ("203.0.113.11", 1, DIRECT_ROUTING)]
    assert d.memory.last_weights == {k: 0 for k in d.memory.last_weights} and len(d.memory.last_weights) == 2
    assert fingerprints(d) == before, "added at weight 0: no last weight, no slot"
    assert d.sync([entry(11), entry(12)]).ops == ()


def test_a_standby_real_server_is_never_given_a_weight():
    """Health changes move the director's own real servers only; a new backend's standby is added at 0."""
    d = FakeDirector(STANDBY)
    d.sync([entry(11), entry(12)])
    assert d.sync([entry(11), entry(12, status="critical")]).ops == (SetDest(KEY, "203.0.113.12", 80, 0),)
    assert d.sync([entry(11), entry(12)]).ops == (SetDest(KEY, "203.0.113.12", 80, 1),)
    p = d.sync([entry(11), entry(12), entry(13)])
    assert not [op for op in p.ops if isinstance(op, DelDest)], "the standby ones stay where they are in the list"
    assert [op for op in p.ops if isinstance(op, AddDest | SetDest) and op.forwarding == GUE_6080] == [
        AddDest(KEY, "192.0.2.13", 80, 0, GUE_6080, True)]
    assert all(w == 0 for a, w, f in d.dests(KEY) if f == GUE_6080)


def test_two_fou_directors_with_and_without_standby_real_servers_have_the_same_table():
    """So `status --discover` sees them agree: a fingerprint ignores real servers without slots."""
    plain, standby = FakeDirector(CONFIG), FakeDirector(STANDBY)
    for d in (plain, standby):
        d.sync([entry(11), entry(12), entry(13, status="critical")])
    assert fingerprints(plain) == fingerprints(standby)


def test_switching_in_place_gives_the_standby_their_weights_before_the_fou_real_servers_go_to_0():
    """Nothing is deleted or re-added (a deletion would expire the connections bound to it), the list order
    needs no repair, and at no moment is every weight 0."""
    d = FakeDirector(STANDBY)
    d.sync([entry(11), entry(12)], now=0)
    d.config = SWITCHED
    p = d.sync([entry(11), entry(12)], now=100)
    assert p.ops == (SetDest(KEY, "192.0.2.12", 80, 1, GUE_6080), SetDest(KEY, "192.0.2.11", 80, 1, GUE_6080),
                     SetDest(KEY, "203.0.113.12", 80, 0), SetDest(KEY, "203.0.113.11", 80, 0))
    weights = {"192.0.2.11": 0, "192.0.2.12": 0, "203.0.113.11": 1, "203.0.113.12": 1}
    for op in p.ops:
        weights[op.address] = op.weight
        assert any(weights.values()), f"every weight 0 after {op.describe()}"
    assert d.dests(KEY) == [("192.0.2.12", 1, GUE_6080), ("192.0.2.11", 1, GUE_6080),
                         ("203.0.113.12", 0, DIRECT_ROUTING), ("203.0.113.11", 0, DIRECT_ROUTING)]
    assert d.sync([entry(11), entry(12)], now=129).ops == ()
    deleted = [op for op in d.sync([entry(11), entry(12)], now=130).ops if isinstance(op, DelDest)]
    assert deleted == [DelDest(KEY, "203.0.113.12", 80), DelDest(KEY, "203.0.113.11", 80)]


def test_a_switched_director_builds_the_table_of_a_director_that_started_in_gue():
    """Once the fou real servers are deleted: the standby became the director's own at its place in the list."""
    switched, fresh = FakeDirector(STANDBY), FakeDirector(SWITCHED)
    switched.sync([entry(11), entry(12)], now=0)
    switched.config = SWITCHED
    switched.sync([entry(11), entry(12)], now=100)
    switched.sync([entry(11), entry(12)], now=130)
    fresh.sync([entry(11), entry(12)], now=0)
    assert switched.dests(KEY) == fresh.dests(KEY)
    assert fingerprints(switched) == fingerprints(fresh)


def test_directors_with_different_histories_and_standby_real_servers_build_the_fou_table_and_switch_alike():
    """Adds, removals, re-registrations, weight changes and flaps, watched by one director and seen only at the
    end by another: the same table as a director without the key, and the switch deletes and re-adds nothing
    (the standby real servers are kept in their order among themselves); after the drain, the same list."""
    for seed in range(20):
        history = random_history(random.Random(seed))
        final = history[-1]
        watcher, late, plain = FakeDirector(STANDBY), FakeDirector(STANDBY), FakeDirector(CONFIG)
        for t, entries in enumerate(history):
            watcher.sync(entries, now=t)
        end = len(history) + CONFIG.drain_timeout + 1
        for d in (watcher, late, plain):
            d.sync(final, now=end)
            d.sync(final, now=end + 1)
        assert fingerprints(watcher) == fingerprints(late) == fingerprints(plain), seed
        assert all(w == 0 for _, w, f in watcher.dests(KEY) if f == GUE_6080), seed
        for d in (watcher, late):
            d.config = SWITCHED
            assert not [op for op in d.sync(final, now=end + 2).ops if isinstance(op, AddDest | DelDest)], seed
            d.sync(final, now=end + 2 + CONFIG.drain_timeout)
        assert watcher.kernel.table_state() == late.kernel.table_state(), seed


# ---- status ------------------------------------------------------------------------------------------------

def test_status_calls_a_standby_real_server_standby_only_when_it_has_no_last_weight():
    d = FakeDirector(STANDBY)
    d.sync([entry(11)])
    live = d.kernel.read()
    marked = standby_servers(live.services, d.memory.last_weights, STANDBY.standby_forwarding)
    assert {k.address for k in marked} == {"192.0.2.11"}
    assert standby_servers(live.services, {}, STANDBY.standby_forwarding) == frozenset(), "no memory: not vouched for"
    assert standby_servers(live.services, d.memory.last_weights, None) == frozenset()
    data = status_json(live, {}, {}, marked)
    data.update(encapsulation="fou", standby_encapsulation="gue")
    text = status_text(json.loads(json.dumps(data)))
    assert "via gue port 6080  standby (weight 0, no slot)" in text.split("-> 192.0.2.11:80")[1].split("\n")[0]
    assert "standby" not in text.split("-> 203.0.113.11:80")[1].split("\n")[0]
    assert "encapsulation: fou (standby gue real servers at weight 0)" in text
