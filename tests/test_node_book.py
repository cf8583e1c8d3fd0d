"""The backend's desired state kept per service (NodeBook) must be indistinguishable from computing it afresh
from the whole snapshot, as the backend did before: a backend that followed every change and one that just
started hold the same VIPs, failures and rejections."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from bridge.catalog.consul_format import snapshot_from_services
from bridge.core.desired import claims_of_node, compute_desired
from bridge.core.node_book import NodeBook
from tests.harness.desired import CONFIG, random_catalog, unique_ids

NODE = "node-3"
BACKEND = replace(CONFIG, node_name=NODE)


@pytest.mark.parametrize("seed", range(30))
def test_a_book_that_followed_a_history_equals_a_fresh_computation_from_the_whole_snapshot(seed):
    rng = random.Random(seed)
    book = NodeBook(BACKEND)
    state: dict[str, list[dict[str, object]]] = {}
    for _ in range(60):
        random_catalog(rng, state)
        snapshot = snapshot_from_services(unique_ids(state))
        got = book.update(snapshot)
        claims, failures = claims_of_node(snapshot, BACKEND, NODE)
        own = {i.instance_id for i in snapshot.instances if i.node == NODE}
        assert got.vips == {c.vip for c in claims}
        assert got.failures == failures
        assert got.rejected == tuple(r for r in compute_desired(snapshot, BACKEND, "0.0.0.0").rejected
                                     if r.instance in own)
        assert got == NodeBook(BACKEND).update(snapshot)
