"""The `gue` encapsulation without a kernel: configuration, desired state, plan, the netlink encoding of the
tunnel attributes, the backend's receivers and the mixed-fleet flag of `status --discover`."""

from __future__ import annotations

import json
import struct
from dataclasses import replace

import pytest

from bridge.catalog.consul_format import snapshot_from_services
from bridge.core.config import ConfigError, parse_config
from bridge.core.desired import compute_desired
from bridge.core.encap import DIRECT_ROUTING, Forwarding, mtu_problem
from bridge.core.ops import AddDest, AddLink, AddRoute, DelDest, DelLink, DelRoute, SetDest
from bridge.dataplane.backend import BackendLive, plan_backend, receivers
from bridge.dataplane.ipvs_netlink import (
    ATTR_DEST,
    CMD_NEW_DEST,
    CMD_SET_DEST,
    DEST_FWD_METHOD,
    DEST_TUN_FLAGS,
    DEST_TUN_PORT,
    DEST_TUN_TYPE,
    Request,
    WireKey,
    _dest_attrs,
    _forwarding,
)
from bridge.dataplane.netlink_batch import parse_attrs
from bridge.inspect.discover import Director, Discovery, discovery_text, read_report
from tests.catalog_builder import catalog, health_entry
from tests.harness.fake_kernel import FakeDirector
from tests.harness.web import CONFIG, GUE, GUE_6080, KEY, entry

# ---- configuration ---------------------------------------------------------------------------------------

def test_encapsulation_defaults_to_fou_and_gue_to_port_6080_without_checksum():
    config = parse_config({})
    assert (config.encapsulation, config.gue_port, config.gue_checksum, config.receivers) == ("fou", 6080, "none",
                                                                                              ("fou",))
    assert config.forwarding == DIRECT_ROUTING
    gue = parse_config({"encapsulation": "gue", "gue_port": 5556, "gue_checksum": "csum"})
    assert gue.forwarding == Forwarding("tunnel", "gue", 5556, "csum") and gue.receivers == ("gue",)


@pytest.mark.parametrize(("raw", "message"), [
    ({"encapsulation": "gre"}, "encapsulation: expected one of ['fou', 'gue'], got 'gre'"),
    ({"gue_port": 0}, "gue_port: expected an integer from 1 to 65535, got 0"),
    ({"gue_checksum": True}, "gue_checksum: expected one of ['none', 'csum', 'remcsum'], got True"),
    ({"receive": "gue"}, "receive: expected a list"),
    ({"receive": []}, "receive: expected a list of some of ['fou', 'gue']"),
    ({"receive": ["fou", "vxlan"]}, "receive[1]: expected one of ['fou', 'gue'], got 'vxlan'"),
    ({"receive": ["gue", "gue"]}, "receive: ['gue', 'gue'] names an encapsulation twice"),
    ({"receive": ["fou", "gue"], "gue_port": 5555}, "gue_port: 5555 is also fou_port; a backend receiving both"),
    ({"encapsulation": "gue", "retire_encapsulation": "gue"}, "retire_encapsulation: gue is also encapsulation"),
    ({"retire_encapsulation": "fou"}, "retire_encapsulation: fou is also encapsulation"),
    ({"standby_encapsulation": "gue", "retire_encapsulation": "gue"},
     "retire_encapsulation: gue is also standby_encapsulation"),
    ({"encapsulation": "gue", "retire_encapsulation": "vxlan"}, "retire_encapsulation: expected one of"),
])
def test_bad_encapsulation_settings_are_refused_naming_the_key(raw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(raw)


# ---- desired state and plan ------------------------------------------------------------------------------

def test_gue_real_servers_are_the_backends_own_addresses_with_no_tunnel_and_no_tunnel_map():
    desired = compute_desired(snapshot_from_services(catalog(entry(11), entry(12))),
                              replace(GUE, tunnel_map=()), "192.0.2.1")
    assert [rs.address for rs in desired.virtual_services[0].real_servers] == ["192.0.2.12", "192.0.2.11"]
    assert desired.tunnels == () and desired.rejected == () and desired.forwarding == GUE_6080


def test_gue_apply_adds_real_servers_with_their_tunnel_and_no_links_or_tunnel_routes():
    d = FakeDirector(GUE)
    p = d.sync([entry(11), entry(12)])
    assert not [op for op in p.ops if isinstance(op, AddLink)]
    assert [op for op in p.ops if isinstance(op, AddRoute)] == [AddRoute("198.51.100.10", "local", "lo")]
    assert [op for op in p.ops if isinstance(op, AddDest)] == [AddDest(KEY, "192.0.2.11", 80, 1, GUE_6080),
                                                               AddDest(KEY, "192.0.2.12", 80, 1, GUE_6080)]
    assert "via gue port 6080 in" in p.ops[-1].describe()
    assert d.sync([entry(11), entry(12)]).ops == ()


def test_a_weight_change_in_gue_mode_repeats_the_tunnel_settings():
    """The kernel's SET_DEST takes absent tunnel attributes as ipip port 0: a bare weight edit would turn a
    GUE real server into an ipip one."""
    d = FakeDirector(GUE)
    d.sync([entry(11), entry(12)])
    assert d.sync([entry(11, status="critical"), entry(12)]).ops == (SetDest(KEY, "192.0.2.11", 80, 0, GUE_6080),)


def test_a_changed_gue_port_or_checksum_is_set_in_place_keeping_order_and_weights():
    d = FakeDirector(GUE)
    d.sync([entry(11), entry(12, status="critical")])
    d.config = replace(GUE, gue_port=7000, gue_checksum="csum")
    moved = Forwarding("tunnel", "gue", 7000, "csum")
    p = d.sync([entry(11), entry(12, status="critical")])
    assert p.ops == (SetDest(KEY, "192.0.2.12", 80, 0, moved), SetDest(KEY, "192.0.2.11", 80, 1, moved))
    assert d.dests(KEY) == [("192.0.2.12", 0, moved), ("192.0.2.11", 1, moved)]


def test_moving_a_director_from_fou_to_gue_drains_the_old_real_servers_through_their_old_tunnels():
    """The old real servers (tunnel addresses, direct routing) keep their forwarding, links and routes at
    weight 0 until drain_timeout, so the connections on them go on; then they, their routes and links go.
    The new real server gets its weight before the old one goes to 0: never a moment without a weight."""
    d = FakeDirector(CONFIG)
    d.sync([entry(11)], now=0)
    d.config = GUE
    p = d.sync([entry(11)], now=100)
    assert p.ops == (AddDest(KEY, "192.0.2.11", 80, 1, GUE_6080), SetDest(KEY, "203.0.113.11", 80, 0, DIRECT_ROUTING))
    assert d.dests(KEY) == [("192.0.2.11", 1, GUE_6080), ("203.0.113.11", 0, DIRECT_ROUTING)]
    assert d.sync([entry(11)], now=129).ops == ()
    assert d.sync([entry(11)], now=130).ops == (DelDest(KEY, "203.0.113.11", 80),
                                                DelRoute("203.0.113.11", "main", "mglc000020b"),
                                                DelLink("mglc000020b"))


def connections(d: FakeDirector, address: str, active: int, inactive: int = 0) -> None:
    """Give one real server of the fake kernel these connection counters (the kernel's ActiveConns, InActConns)."""
    service = d.kernel.services[KEY]
    d.kernel.services[KEY] = replace(service, real_servers=tuple(
        replace(rs, active_conns=active, inactive_conns=inactive) if rs.address == address else rs
        for rs in service.real_servers))


def test_a_retired_encapsulations_real_servers_go_together_once_none_holds_a_connection():
    """`retire_encapsulation: fou` (the runbook's last step, once every director is gue): the old real servers of
    a virtual service are deleted, with their routes and links, in the first pass that finds none of them holding
    a connection entry, long before their deadline; an entry on any of them, even an inactive one (maybe a
    half-closed connection still receiving), keeps them all."""
    d = FakeDirector(CONFIG)
    d.sync([entry(11), entry(12)], now=0)
    d.config = GUE
    d.sync([entry(11), entry(12)], now=100)
    connections(d, "203.0.113.11", active=2)
    connections(d, "203.0.113.12", active=0, inactive=1)
    d.config = replace(GUE, retire_encapsulation="fou")
    assert d.sync([entry(11), entry(12)], now=101).ops == ()
    connections(d, "203.0.113.11", active=0, inactive=0)
    assert d.sync([entry(11), entry(12)], now=102).ops == ()
    connections(d, "203.0.113.12", active=0, inactive=0)
    assert d.sync([entry(11), entry(12)], now=103).ops == (
        DelDest(KEY, "203.0.113.12", 80), DelDest(KEY, "203.0.113.11", 80),
        DelRoute("203.0.113.11", "main", "mglc000020b"), DelRoute("203.0.113.12", "main", "mglc000020c"),
        DelLink("mglc000020b"), DelLink("mglc000020c"))
    assert d.dests(KEY) == [("192.0.2.12", 1, GUE_6080), ("192.0.2.11", 1, GUE_6080)]


def test_retiring_an_encapsulation_leaves_the_directors_own_drains_to_their_deadline():
    """A backend that leaves the catalog drains as always, idle or not: only the retired encapsulation's real
    servers go early."""
    d = FakeDirector(replace(GUE, retire_encapsulation="fou"))
    d.sync([entry(11), entry(12)], now=0)
    assert d.sync([entry(11)], now=1).ops == (SetDest(KEY, "192.0.2.12", 80, 0, GUE_6080),)
    assert d.sync([entry(11)], now=30).ops == ()
    assert d.sync([entry(11)], now=31).ops == (DelDest(KEY, "192.0.2.12", 80),)


def test_moving_back_from_gue_to_fou_drains_the_gue_real_servers_with_their_gue_forwarding():
    d = FakeDirector(GUE)
    d.sync([entry(11)], now=0)
    d.config = CONFIG
    p = d.sync([entry(11)], now=1)
    assert SetDest(KEY, "192.0.2.11", 80, 0, GUE_6080) in p.ops and AddDest(KEY, "203.0.113.11", 80, 1) in p.ops


# ---- netlink encoding --------------------------------------------------------------------------------------

def test_the_tunnel_port_goes_to_the_kernel_in_network_byte_order():
    """The kernel reads IPVS_DEST_ATTR_TUN_PORT with nla_get_be16; pyroute2 0.9.7 sends it host-order."""
    request = Request(CMD_NEW_DEST, WireKey("198.51.100.10", 80, 6), dest=("192.0.2.11", 80), weight=1,
                      forwarding=Forwarding("tunnel", "gue", 5555, "remcsum"))
    outer = _dest_attrs(request)
    dest = parse_attrs(outer, 0, len(outer))[ATTR_DEST]
    attrs = parse_attrs(dest, 0, len(dest))
    assert attrs[DEST_TUN_PORT][:2] == b"\x15\xb3"  # 5555, big-endian
    assert attrs[DEST_TUN_TYPE][:1] == b"\x01" and struct.unpack("=H", attrs[DEST_TUN_FLAGS][:2])[0] == 2
    assert struct.unpack("=I", attrs[DEST_FWD_METHOD][:4])[0] == 2
    assert _forwarding(attrs) == Forwarding("tunnel", "gue", 5555, "remcsum")


def test_direct_routing_sends_no_tunnel_attributes_as_before():
    request = Request(CMD_SET_DEST, WireKey("198.51.100.10", 80, 6), dest=("203.0.113.11", 80), weight=1)
    outer = _dest_attrs(request)
    dest = parse_attrs(outer, 0, len(outer))[ATTR_DEST]
    attrs = parse_attrs(dest, 0, len(dest))
    assert DEST_TUN_PORT not in attrs and DEST_TUN_TYPE not in attrs and _forwarding(attrs) == DIRECT_ROUTING


# ---- backend receivers -------------------------------------------------------------------------------------

def live(ports):
    return BackendLive((), ports, True, {"all/arp_ignore": 1, "all/arp_announce": 2})


def test_backend_receivers_follow_the_encapsulation_or_receive_both_during_a_migration():
    assert receivers(CONFIG) == (("fou", 5555),)
    assert receivers(GUE) == (("gue", 6080),)
    both = replace(GUE, receive=("fou", "gue"))
    ops = plan_backend([], live({}), receivers(both))
    assert [op.describe() for op in ops] == ["add fou port 5555", "add gue port 6080"]
    assert plan_backend([], live({5555: "ipip", 6080: "gue"}), receivers(both)) == []


def test_a_port_that_receives_the_other_encapsulation_is_a_conflict_and_left_alone():
    ops = plan_backend([], live({6080: "ipip"}), receivers(GUE))
    assert [(op.kind, op.target) for op in ops] == [
        ("conflict", "fou port 6080 receives ipip, not gue (gue needs its own port)")]
    ops = plan_backend([], live({5555: "gue"}), receivers(CONFIG))
    assert ops[0].kind == "conflict" and "receives gue, not ipip" in ops[0].target


# ---- MTU ---------------------------------------------------------------------------------------------------

def test_the_underlay_must_carry_1500_bytes_plus_the_encapsulation():
    assert mtu_problem("fou", "eth0", 1528) is None and mtu_problem("gue", "eth0", 1532) is None
    warning = mtu_problem("gue", "eth0", 1500)
    assert warning is not None and "underlay MTU 1500 on eth0" in warning and "raise it to 1532" in warning
    assert "raise it to 1528" in (mtu_problem("fou", "eth0", 1527) or "")


# ---- status --discover -------------------------------------------------------------------------------------

def report(encapsulation, fingerprint):
    body = {"agent": {"role": "director", "ready": True, "version": "0.1.0"},
            "virtual_services": [{"vip": "198.51.100.10", "port": 80, "protocol": "tcp", "fingerprint": fingerprint}]}
    if encapsulation:
        body["encapsulation"] = encapsulation
    return read_report(json.dumps(body))


def test_discovery_flags_a_fleet_of_mixed_encapsulations():
    found = Discovery([Director("10.0.0.1", 9119, report("gue", "aaaa")),
                       Director("10.0.0.2", 9119, report(None, "bbbb")),
                       Director("10.0.0.3", 9119, report("fou", "bbbb"))])
    found.fingerprints["198.51.100.10:80/tcp"] = {"10.0.0.1:9119": "aaaa", "10.0.0.2:9119": "bbbb",
                                                  "10.0.0.3:9119": "bbbb"}
    text = discovery_text(found)
    assert ("MIXED ENCAPSULATION (fou: 10.0.0.2:9119, 10.0.0.3:9119; gue: 10.0.0.1:9119): their Maglev tables "
            "differ by design") in text


def test_discovery_of_one_encapsulation_says_nothing_about_it():
    found = Discovery([Director("10.0.0.1", 9119, report("gue", "aaaa")),
                       Director("10.0.0.2", 9119, report("gue", "aaaa"))])
    assert "MIXED" not in discovery_text(found)


# ---- what status and plan print ----------------------------------------------------------------------------

def test_status_shows_each_real_servers_forwarding_the_encapsulation_and_the_mtu_warning():
    from bridge.core.live import LiveRealServer, LiveService, LiveState
    from bridge.inspect.text import desired_json, status_json, status_text

    live = LiveState((LiveService("198.51.100.10", 80, "tcp", "mh", ("mh-port",), (
        LiveRealServer("192.0.2.11", 80, 1, forwarding=GUE_6080), LiveRealServer("203.0.113.11", 80, 0))),))
    data = status_json(live, {}, {})
    data.update(encapsulation="gue", mtu_warning=mtu_problem("gue", "eth0", 1500))
    text = status_text(json.loads(json.dumps(data)))
    assert "-> 192.0.2.11:80" in text and "via gue port 6080" in text.split("-> 192.0.2.11:80")[1].split("\n")[0]
    assert "via" not in text.split("-> 203.0.113.11:80")[1].split("\n")[0], "direct routing prints nothing more"
    assert "encapsulation: gue" in text and "WARNING: underlay MTU 1500 on eth0" in text
    desired = compute_desired(snapshot_from_services(catalog(entry(11))), GUE, "192.0.2.1")
    assert desired_json(desired)["forwarding"] == {"method": "tunnel", "tunnel": "gue", "port": 6080,
                                                   "checksum": "none"}


# ---- IPv6 VIPs -----------------------------------------------------------------------------------------------

def test_ipv6_vips_are_served_in_gue_mode_by_the_backends_ipv4_addresses_and_refused_in_fou_mode():
    v6 = {"vip_cidrs": ["198.51.100.0/24", "2001:db8:10::/64"]}
    e = health_entry("web", "b11", "192.0.2.11", 80, ["maglev.vip=[2001:db8:10::10]:80"], create_index=11)
    desired = compute_desired(snapshot_from_services(catalog(e)), parse_config({**v6, "encapsulation": "gue"}),
                              "192.0.2.1")
    assert [(vs.vip, [rs.address for rs in vs.real_servers]) for vs in desired.virtual_services] == [
        ("2001:db8:10::10", ["192.0.2.11"])]
    fou = parse_config({**v6, "tunnel_map": [{"backend": "192.0.2.0/24", "tunnel": "203.0.113.0/24"}]})
    desired = compute_desired(snapshot_from_services(catalog(e)), fou, "192.0.2.1")
    assert desired.virtual_services == () and "IPv6 VIPs need encapsulation: gue" in desired.rejected[0].reason


def test_a_backend_receiving_ipv6_vips_by_gue_needs_sit0_up():
    ipv6 = ["2001:db8:10::10"]
    assert [op.describe() for op in plan_backend(ipv6, replace(live({6080: "gue"}), sit_up=False),
                                                 receivers(GUE)) if "sit0" in op.target] == ["link up sit0"]
    ops = plan_backend(ipv6, live({6080: "gue"}), receivers(GUE))
    assert [op.target for op in ops if op.kind == "conflict"] == [
        "sit0 is missing: load the sit module (modprobe sit); GUE hands IPv6 packets to it"]
    assert not [op for op in plan_backend(["198.51.100.10"], live({6080: "gue"}), receivers(GUE)) if "sit0" in
                op.target], "IPv4 VIPs need no sit0"
