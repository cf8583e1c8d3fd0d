"""The backend's boundary: one node's service list and checks become exactly the instances the director reads
from the same catalog by service, a bad entry is rejected alone with its field, and an answer that is not
the expected document fails as a whole."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bridge.catalog.consul_format import CatalogFormatError, parse_node, parse_service
from tests.catalog_builder import health_entry

TAG = "maglev.vip"
ENTRIES = [
    health_entry("web", "b1", "192.0.2.11", 80, ["maglev.vip=198.51.100.10:80"], node_status="warning",
                 create_index=5),
    health_entry("api", "b1", "192.0.2.11", 8080, ["maglev.vip=198.51.100.11:80"], status="critical",
                 node_status="warning", create_index=6),
]


def node_answers(entries: list[dict[str, Any]]) -> tuple[str, str]:
    """`/v1/catalog/node-services/b1` and `/v1/health/node/b1` for the node that `entries` list."""
    node = entries[0]["Node"]
    services = {"Node": node, "Services": [e["Service"] for e in entries]}
    checks = {(c["CheckID"], c["ServiceID"]): c for e in entries for c in e["Checks"]}
    return json.dumps(services), json.dumps(list(checks.values()))


def test_a_nodes_services_and_checks_are_the_instances_the_director_reads_by_service():
    by_service = [i for e in ENTRIES for i in parse_service(e["Service"]["Service"], json.dumps([e])).instances]
    parsed = parse_node(*node_answers(ENTRIES), TAG)
    assert parsed.instances == tuple(sorted(by_service, key=lambda i: i.service))
    assert [i.health for i in parsed.instances] == ["critical", "warning"]


def test_services_without_the_vip_tag_are_not_listed():
    plain = health_entry("plain", "b1", "192.0.2.11", 81, ["other"])
    assert [i.service for i in parse_node(*node_answers([*ENTRIES, plain]), TAG).instances] == ["api", "web"]


def test_a_bad_entry_is_rejected_with_its_field_and_the_others_go_on():
    bad = health_entry("bad", "b1", "192.0.2.11", 80, ["maglev.vip=198.51.100.12:80"])
    bad["Service"]["Port"] = "80"
    parsed = parse_node(*node_answers([*ENTRIES, bad]), TAG)
    assert [i.service for i in parsed.instances] == ["api", "web"]
    assert [(r.service, r.instance, r.reason) for r in parsed.rejected] == [
        ("bad", "bad-b1", "field Service.Port: expected `int`, got `str`")]


@pytest.mark.parametrize("services", ['{"Node": null, "Services": null}', "null"])
def test_a_node_consul_does_not_know_is_not_taken_for_an_empty_one(services):
    assert parse_node(services, "[]", TAG) is None


@pytest.mark.parametrize("services, checks", [
    ("not json", "[]"), ('{"Node": {}}', "[]"), ('{"Node": 1}', "[]"), ("null", '{"a": 1}')])
def test_answers_that_are_not_the_documents_fail_as_a_whole(services, checks):
    with pytest.raises(CatalogFormatError, match="the node's services or checks do not fit"):
        parse_node(services, checks, TAG)
