"""Backends whose Consul address is IPv6 (an IPv6 underlay), without a kernel: which combinations the desired
state accepts (`gue` mode: IPv6 VIPs; IPv4 VIPs, `fou` mode and connection sync across families are refused with
a reason), the keys that name IPv6 real servers, the IPv6 underlay's MTU, and what the backend role must add to
receive GUE over IPv6. tests/kernel/test_ipv6_underlay.py proves the same on the VM kernel."""

from __future__ import annotations

from dataclasses import replace

from bridge.catalog.consul_format import snapshot_from_services
from bridge.core.config import ConnSyncConfig, parse_config
from bridge.core.desired import compute_desired
from bridge.core.encap import ipv6_underlay, mtu_problem
from bridge.core.keys import DestKey, ServiceKey
from bridge.core.model import Snapshot
from bridge.core.node_book import NodeBook
from bridge.dataplane.backend import BackendLive, plan_backend, receivers
from tests.catalog_builder import catalog, health_entry

BASE = {"vip_cidrs": ["198.51.100.0/24", "2001:db8:10::/64"], "encapsulation": "gue"}
GUE = parse_config(BASE)
FOU = parse_config({**BASE, "encapsulation": "fou",
                    "tunnel_map": [{"backend": "192.0.2.0/24", "tunnel": "203.0.113.0/24"}]})
SYNCED = replace(GUE, conn_sync=ConnSyncConfig("eth0", 7))
VIP4 = "maglev.vip=198.51.100.10:80"
VIP6 = "maglev.vip=[2001:db8:10::10]:80"


def desired(config, *entries):
    return compute_desired(snapshot_from_services(catalog(*entries)), config, "192.0.2.1")


def web(node, address, tags, index=10):
    return health_entry("web", node, address, 80, tags, create_index=index)


def servers(state):
    return {vs.key.text: [rs.address for rs in vs.real_servers] for vs in state.virtual_services}


# ---- which combinations are built --------------------------------------------------------------------------

def test_in_gue_mode_an_ipv6_backend_is_a_real_server_of_ipv6_vips_by_its_canonical_address():
    state = desired(GUE, web("b1", "2001:DB8:1:0::5", [VIP6]), web("b2", "192.0.2.2", [VIP4, VIP6], 11))
    assert servers(state) == {"198.51.100.10:80/tcp": ["192.0.2.2"],
                              "[2001:db8:10::10]:80/tcp": ["192.0.2.2", "2001:db8:1::5"]}
    assert state.rejected == () and state.tunnels == (), "no link, no route: IPVS encapsulates over either family"
    keys = [str(DestKey(vs.key, rs.address, rs.port)) for vs in state.virtual_services for rs in vs.real_servers]
    assert "[2001:db8:10::10]:80/tcp>[2001:db8:1::5]:80" in keys and "[2001:db8:10::10]:80/tcp>192.0.2.2:80" in keys
    assert all(DestKey.parse(k).text == k for k in keys), "every key reads back as itself"


def test_an_ipv6_backend_of_an_ipv4_vip_is_refused_because_the_kernel_hashes_only_its_first_32_bits():
    """ip_vs_mh_permutate hashes a real server by its service's family: every IPv6 backend of one /32 would get
    the same Maglev permutation, and one leaving would move most flows (README: underlays). The instance's whole
    claim is refused, as for any bad claim; every other instance and virtual service is built as before."""
    state = desired(GUE, web("b1", "2001:db8:1::5", [VIP6, VIP4]), web("b2", "2001:db8:1::6", [VIP6], 11),
                    web("b3", "192.0.2.3", [VIP4], 12))
    assert servers(state) == {"198.51.100.10:80/tcp": ["192.0.2.3"], "[2001:db8:10::10]:80/tcp": ["2001:db8:1::6"]}
    (refused,) = state.rejected
    assert (refused.service, refused.instance, refused.tag) == ("web", "web-b1", VIP4)
    assert refused.reason.startswith("backend address 2001:db8:1::5 is IPv6 and VIP 198.51.100.10 is IPv4: the "
                                     "kernel's Maglev hashes only the first 32 bits of an IPv4 VIP's IPv6 real "
                                     "servers")
    assert refused.reason.endswith("use an IPv6 VIP ([...]:80) or give the instance an IPv4 address")
    assert desired(GUE, web("b1", "192.0.2.1", [VIP4])).rejected == (), "IPv4 backends of IPv4 VIPs are built"


def test_in_fou_mode_an_ipv6_backend_is_refused_naming_the_service_instance_tag_and_gue():
    state = desired(FOU, web("b1", "2001:db8:1::5", [VIP4]), web("b2", "192.0.2.2", [VIP4], 11))
    assert servers(state) == {"198.51.100.10:80/tcp": ["203.0.113.2"]}, "the IPv4 backend is served as before"
    (refused,) = state.rejected
    assert (refused.service, refused.instance, refused.tag) == ("web", "web-b1", VIP4)
    assert "backend address 2001:db8:1::5 is IPv6" in refused.reason
    assert "ipip+fou links, which carry IPv4 only" in refused.reason and "encapsulation: gue" in refused.reason


def test_a_backend_address_that_is_no_address_is_refused_naming_both_families():
    (refused,) = desired(GUE, web("b1", "backend-1.example", [VIP4])).rejected
    assert refused.reason == "backend address 'backend-1.example' is not an IPv4 or IPv6 address"


def test_with_connection_sync_a_real_server_of_another_family_than_its_vip_is_refused():
    """ip_vs_ctl.c refuses such a real server while a sync daemon runs, and a daemon while one exists."""
    state = desired(SYNCED, web("b1", "2001:db8:1::5", [VIP6]), web("b2", "192.0.2.6", [VIP6], 11),
                    web("b3", "192.0.2.3", [VIP4], 12))
    assert servers(state) == {"198.51.100.10:80/tcp": ["192.0.2.3"], "[2001:db8:10::10]:80/tcp": ["2001:db8:1::5"]}
    (refused,) = state.rejected
    assert (refused.instance, refused.tag) == ("web-b2", VIP6)
    assert "backend address 192.0.2.6 is IPv4 and VIP 2001:db8:10::10 is IPv6" in refused.reason
    assert "conn_sync" in refused.reason
    assert desired(GUE, web("b2", "192.0.2.6", [VIP6])).rejected == (), "without conn_sync it is built"


def test_mtu_of_gue_over_an_ipv6_underlay_is_1552_and_the_check_follows_the_lowest_ipv6_real_server():
    assert mtu_problem("gue", "eth0", 1552, outer=6) is None
    warning = mtu_problem("gue", "eth0", 1532, outer=6) or ""
    assert warning.startswith("IPv6 underlay MTU 1532 on eth0 cannot carry 1500-byte packets in gue "
                              "encapsulation (+52 bytes): raise it to 1552 or more")
    assert ipv6_underlay(["192.0.2.2", "2001:db8:1::9", "2001:DB8:1::5"]) == "2001:db8:1::5"
    assert ipv6_underlay(["192.0.2.2"]) is None


# ---- the backend role ----------------------------------------------------------------------------------------

def ready(**changes):
    """A backend that receives GUE over IPv4 and has nothing else to do."""
    base = BackendLive((), {6080: "gue"}, True, {"all/arp_ignore": 1, "all/arp_announce": 2}, sit_up=True)
    return replace(base, **changes)


def test_a_backend_with_an_ipv6_address_receives_gue_over_ipv6_through_ip6tnl0_as_the_kernel_made_it():
    """ip6tnl0 is brought up, its mode (shared with every other user of the device) and its rp_filter are left
    alone: the inner packets are IPv6, which the module's default mode (ip6ip6) takes."""
    ops = plan_backend(["2001:db8:10::10"], ready(ip6tnl=(False, 41), sysctls={"ip6tnl0/rp_filter": 1}),
                       receivers(GUE), frozenset({6}))
    assert [op.describe() for op in ops] == [
        "add gue port 6080 over IPv6", "link up ip6tnl0", "set net.ipv4.conf.all.arp_ignore = 1",
        "set net.ipv4.conf.all.arp_announce = 2", "add vip 2001:db8:10::10"]
    assert not [op for op in ops if "sit0" in op.target], "IPv6 VIPs over an IPv6 underlay need no sit0"
    for mode in (41, 0):
        done = ready(fou6_ports={6080: "gue"}, ip6tnl=(True, mode), vips=("2001:db8:10::10",))
        assert plan_backend(["2001:db8:10::10"], done, receivers(GUE), frozenset({6})) == [], f"mode {mode}"


def test_a_missing_ip6tnl0_or_a_foreign_ipv6_port_is_a_conflict_naming_what_to_do():
    ops = plan_backend([], ready(fou6_ports={6080: "ipip"}), receivers(GUE), frozenset({4, 6}))
    assert [op.target for op in ops if op.kind == "conflict"] == [
        "fou port 6080 over IPv6 receives ipip, not gue (gue needs its own port)",
        "ip6tnl0 is missing: load the ip6_tunnel module (modprobe ip6_tunnel); GUE over IPv6 hands its packets to it"]


def test_an_ip6tnl0_in_a_mode_that_takes_no_ipv6_is_a_conflict_naming_the_fix_and_is_not_changed():
    ops = plan_backend([], ready(fou6_ports={6080: "gue"}, ip6tnl=(True, 4)), receivers(GUE), frozenset({6}))
    assert [(op.kind, op.target) for op in ops] == [
        ("conflict", "ip6tnl0 is in mode ipip6, which takes no IPv6 packets, and GUE over IPv6 hands it IPv6 ones: "
                     "ip -6 tunnel change ip6tnl0 mode ip6ip6")]


def test_only_gue_and_only_an_ipv6_address_make_a_backend_receive_over_ipv6():
    fou_live = BackendLive((), {5555: "ipip"}, True, {"all/arp_ignore": 1, "all/arp_announce": 2})
    assert plan_backend([], fou_live, receivers(FOU), frozenset({6})) == []
    assert plan_backend([], ready(), receivers(GUE), frozenset({4})) == []


def test_the_node_book_reports_the_families_of_its_instances_that_claim_a_vip():
    config = replace(GUE, node_name="b1")
    untagged = health_entry("db", "b1", "2001:db8:1::7", 5432, [], create_index=3)
    book = NodeBook(config)
    assert book.update(snapshot_from_services(catalog(web("b1", "192.0.2.1", [VIP4]), untagged))).underlays == {4}
    both = catalog(web("b1", "192.0.2.1", [VIP4]), health_entry("api", "b1", "2001:db8:1::5", 80, [VIP6]))
    assert book.update(snapshot_from_services(both)).underlays == {4, 6}
    assert NodeBook(config).update(Snapshot(())).underlays == frozenset()


def test_service_keys_of_ipv4_vips_still_sort_before_ipv6_ones_with_ipv6_real_servers():
    state = desired(GUE, web("b1", "2001:db8:1::5", [VIP6]), web("b2", "192.0.2.2", [VIP4], 11))
    assert [vs.key for vs in state.virtual_services] == [ServiceKey("198.51.100.10", 80, "tcp"),
                                                         ServiceKey("2001:db8:10::10", 80, "tcp")]
