"""The incremental desired state (DesiredBook) must be indistinguishable from computing it afresh: a
director that has followed every change and one that just started must hold equal values."""

from __future__ import annotations

import random

import pytest

from bridge.catalog.consul_format import snapshot_from_services
from bridge.core.desired import DesiredBook, compute_desired
from tests.catalog_builder import catalog, health_entry
from tests.harness.desired import CONFIG, random_catalog, unique_ids


@pytest.mark.parametrize("seed", range(40))
def test_book_that_followed_a_history_equals_a_fresh_computation(seed):
    rng = random.Random(seed)
    book = DesiredBook(CONFIG)
    state: dict[str, list[dict[str, object]]] = {}
    previous = book.desired("192.0.2.1")
    for _ in range(60):
        random_catalog(rng, state)
        snapshot = snapshot_from_services(unique_ids(state))
        changed = book.update(snapshot)
        got = book.desired("192.0.2.1")
        assert got == compute_desired(snapshot, CONFIG, "192.0.2.1")
        before = {vs.key: vs for vs in previous.virtual_services}
        after = {vs.key: vs for vs in got.virtual_services}
        assert changed == {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        previous = got


def test_health_change_of_one_instance_touches_only_its_virtual_service():
    entries = [health_entry(f"svc-{i}", f"b{i}", f"192.0.2.{i + 2}", 80, [f"maglev.vip=198.51.100.{i + 1}:80"])
               for i in range(50)]
    book = DesiredBook(CONFIG)
    assert len(book.update(snapshot_from_services(catalog(*entries)))) == 50
    entries[7] = health_entry("svc-7", "b7", "192.0.2.9", 80, ["maglev.vip=198.51.100.8:80"], status="critical")
    assert book.update(snapshot_from_services(catalog(*entries))) == {("198.51.100.8", 80, "tcp")}
    assert book.update(snapshot_from_services(catalog(*entries))) == frozenset()


def test_withdrawing_the_winner_of_a_contested_vip_hands_it_to_the_next_service():
    first = health_entry("alpha", "b1", "192.0.2.3", 80, ["maglev.vip=198.51.100.10:80"], create_index=5)
    second = health_entry("beta", "b2", "192.0.2.4", 80, ["maglev.vip=198.51.100.10:80"], create_index=9)
    book = DesiredBook(CONFIG)
    book.update(snapshot_from_services(catalog(first, second)))
    assert [vs.service for vs in book.desired("192.0.2.1").virtual_services] == ["alpha"]
    assert [r.service for r in book.desired("192.0.2.1").rejected] == ["beta"]
    assert book.update(snapshot_from_services(catalog(second))) == {("198.51.100.10", 80, "tcp")}
    state = book.desired("192.0.2.1")
    assert [vs.service for vs in state.virtual_services] == ["beta"] and state.rejected == ()
