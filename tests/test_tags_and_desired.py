from __future__ import annotations

import pytest

from bridge.catalog.consul_format import snapshot_from_services
from bridge.core.desired import claims_of_node
from tests.catalog_builder import catalog, health_entry
from tests.harness.desired import CONFIG, desired, web


def test_vip_tag_defaults_port_to_instance_port_and_protocol_to_tcp():
    d = desired(web("b1", 11, ["maglev.vip=198.51.100.10"]))
    vs = d.virtual_services[0]
    assert (vs.vip, vs.port, vs.protocol, vs.scheduler) == ("198.51.100.10", 8080, "tcp", "mh")
    assert vs.flags == ("mh-fallback", "mh-port")
    assert [(rs.address, rs.port, rs.weight) for rs in vs.real_servers] == [("203.0.113.11", 8080, 1)]


def test_vip_tag_is_repeatable_with_port_and_udp():
    d = desired(web("b1", 11, ["maglev.vip=198.51.100.10:80", "maglev.vip=198.51.100.10:53/udp"]))
    assert [vs.key for vs in d.virtual_services] == [("198.51.100.10", 53, "udp"), ("198.51.100.10", 80, "tcp")]


def test_instance_without_vip_tag_is_ignored_even_with_other_maglev_tags():
    d = desired(web("b1", 11, ["maglev.weight=abc"]))
    assert d.virtual_services == () and d.rejected == ()


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("maglev.vip=198.51.100.300:80", "is not an IPv4 or IPv6 address"),
        ("maglev.vip=198.51.100.10:0", "port '0' is not a number from 1 to 65535"),
        ("maglev.vip=198.51.100.10:70000", "port '70000'"),
        ("maglev.vip=198.51.100.10:80/sctp", "protocol 'sctp' is not tcp or udp"),
        ("maglev.vip=10.0.0.1:80", "outside vip_cidrs"),
        ("maglev.vip=[2001:db8::1]:80", "VIP 2001:db8::1 is outside vip_cidrs (198.51.100.0/24)"),
        ("maglev.vip", "expected maglev.vip=<value>"),
    ],
)
def test_malformed_vip_rejects_the_claim_naming_service_instance_tag_and_expectation(tag, expected):
    d = desired(web("b1", 11, ["maglev.vip=198.51.100.10:80", tag] if tag != "maglev.vip" else [tag]),
                web("b2", 12, ["maglev.vip=198.51.100.10:80"]))
    (rej,) = d.rejected
    assert (rej.service, rej.instance, rej.tag) == ("web", "web-b1", tag)
    assert expected in rej.reason
    # the rest of the catalog is unaffected, and the rejected instance adds nothing
    assert [rs.address for vs in d.virtual_services for rs in vs.real_servers] == ["203.0.113.12"]


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("maglev.weight=65536", "weight '65536' is not an integer from 0 to 65535"),
        ("maglev.weight=-1", "weight '-1'"),
        ("maglev.flags=mh-port,sh-fallback", "unknown flag(s) 'sh-fallback'"),
        ("maglev.colour=blue", "unknown key 'colour'"),
    ],
)
def test_malformed_weight_flags_or_key_rejects_the_claim(tag, expected):
    d = desired(web("b1", 11, ["maglev.vip=198.51.100.10:80", tag]))
    assert d.virtual_services == ()
    assert expected in d.rejected[0].reason and d.rejected[0].tag == tag


def test_backend_outside_tunnel_map_is_rejected():
    d = desired(health_entry("web", "far", "192.0.2.200", 80, ["maglev.vip=198.51.100.10:80"]))
    assert d.virtual_services == ()
    assert "outside every tunnel_map backend prefix (192.0.2.0/25)" in d.rejected[0].reason


def test_earliest_registered_service_wins_a_contested_vip_regardless_of_catalog_order():
    a = health_entry("alpha", "b1", "192.0.2.11", 80, ["maglev.vip=198.51.100.10:80"], create_index=50)
    b = health_entry("beta", "b2", "192.0.2.12", 80, ["maglev.vip=198.51.100.10:80"], create_index=40)
    for entries in ((a, b), (b, a)):
        d = desired(*entries)
        assert [vs.service for vs in d.virtual_services] == ["beta"]
        assert d.rejected[0].service == "alpha" and "already claimed by service 'beta'" in d.rejected[0].reason


def test_equal_create_index_tie_is_broken_by_service_name():
    a = health_entry("alpha", "b1", "192.0.2.11", 80, ["maglev.vip=198.51.100.10:80"], create_index=40)
    b = health_entry("beta", "b2", "192.0.2.12", 80, ["maglev.vip=198.51.100.10:80"], create_index=40)
    assert desired(b, a).virtual_services[0].service == "alpha"


def test_real_servers_are_ordered_newest_first_by_earliest_create_index():
    d = desired(web("b1", 11, ["maglev.vip=198.51.100.10:80"], create_index=30),
                web("b2", 12, ["maglev.vip=198.51.100.10:80"], create_index=10),
                web("b3", 13, ["maglev.vip=198.51.100.10:80"], create_index=20))
    assert [rs.address for rs in d.virtual_services[0].real_servers] == [
        "203.0.113.11", "203.0.113.13", "203.0.113.12"]


def test_node_weight_sums_passing_instances_and_critical_ones_remember_their_tagged_weight():
    d = desired(
        health_entry("web", "b1", "192.0.2.11", 80, ["maglev.vip=198.51.100.10:80", "maglev.weight=3"],
                     instance_id="web-1", create_index=5),
        health_entry("web", "b1", "192.0.2.11", 81, ["maglev.vip=198.51.100.10:80", "maglev.weight=2"],
                     instance_id="web-2", create_index=6, status="critical"),
        health_entry("web", "b2", "192.0.2.12", 80, ["maglev.vip=198.51.100.10:80", "maglev.weight=4"],
                     status="critical", create_index=7),
        health_entry("web", "b3", "192.0.2.13", 80, ["maglev.vip=198.51.100.10:80"], status="warning"),
    )
    by_addr = {rs.address: rs for rs in d.virtual_services[0].real_servers}
    assert (by_addr["203.0.113.11"].weight, by_addr["203.0.113.11"].last_weight) == (3, 3)
    assert (by_addr["203.0.113.12"].weight, by_addr["203.0.113.12"].last_weight) == (0, 4)
    assert by_addr["203.0.113.13"].weight == 1


def test_node_level_check_failure_drains_the_node():
    d = desired(web("b1", 11, ["maglev.vip=198.51.100.10:80"], node_status="critical"))
    assert d.virtual_services[0].real_servers[0].weight == 0


def test_warning_can_be_configured_not_to_serve():
    from dataclasses import replace
    d = desired(web("b1", 11, ["maglev.vip=198.51.100.10:80"], status="warning"),
                config=replace(CONFIG, warning_serves=False))
    assert d.virtual_services[0].real_servers[0].weight == 0


def test_tunnels_and_vip_routes_follow_the_real_servers():
    d = desired(web("b1", 11, ["maglev.vip=198.51.100.10:80", "maglev.vip=198.51.100.11:80"]))
    assert d.vip_routes == ("198.51.100.10", "198.51.100.11")
    (t,) = d.tunnels
    assert (t.name, t.remote, t.local, t.tunnel_address, t.fou_port) == (
        "mglc000020b", "192.0.2.11", "192.0.2.1", "203.0.113.11", 5555)


def test_desired_state_does_not_depend_on_catalog_order():
    entries = [web(f"b{n}", n, ["maglev.vip=198.51.100.10:80"], create_index=100 - n) for n in range(11, 30)]
    assert desired(*entries) == desired(*reversed(entries))


def test_backend_role_claims_include_critical_instances_of_this_node_only():
    snap = snapshot_from_services(catalog(
        web("backend-1", 11, ["maglev.vip=198.51.100.10:80"], status="critical"),
        web("backend-2", 12, ["maglev.vip=198.51.100.11:80"]),
    ))
    claims, failures = claims_of_node(snap, CONFIG, "backend-1")
    assert [c.vip for c in claims] == ["198.51.100.10"] and failures == {}
