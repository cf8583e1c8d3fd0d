"""IPv6 VIPs in the pure core: tag grammar, keys, vip_cidrs and allow lists (bridge/core).

Until a fleet can run `encapsulation: gue` every IPv6 claim is refused by `tags.ipv6_vip_refusal`; the tests of
what an accepted IPv6 claim becomes lift that refusal with the `gue_fleet` fixture, as the gue mode will.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.core import tags
from bridge.core.addr import canonical_ip, ip_value, split_host_port
from bridge.core.allow import admits, collapse, for_family, parse_prefixes
from bridge.core.config import ConfigError, parse_config
from bridge.core.keys import DestKey, ServiceKey
from tests.harness.desired import CONFIG, desired, web

V6_CONFIG = replace(CONFIG, vip_cidrs=(*CONFIG.vip_cidrs, ipaddress.IPv6Network("2001:db8:10::/64")))
VIP6 = "maglev.vip=[2001:db8:10::10]:80/tcp"
VIP4 = "maglev.vip=198.51.100.10:80"


@pytest.fixture
def gue_fleet(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `encapsulation: gue` will do to the refusal: lift it."""
    monkeypatch.setattr(tags, "ipv6_vip_refusal", lambda config: None)


def test_an_ipv6_claim_is_refused_naming_service_instance_tag_and_the_mode_it_needs():
    d = desired(web("b1", 11, [VIP4, VIP6]), web("b2", 12, [VIP4]), config=V6_CONFIG)
    (rej,) = d.rejected
    assert (rej.service, rej.instance, rej.tag) == ("web", "web-b1", VIP6)
    assert "IPv6 VIPs need encapsulation: gue" in rej.reason
    (vs,) = d.virtual_services
    assert [rs.backend for rs in vs.real_servers] == ["192.0.2.12"], "the refused instance's whole claim goes"


def test_an_ipv6_claim_refused_on_this_fleet_is_refused_for_the_backend_role_too():
    from bridge.catalog.consul_format import snapshot_from_services
    from bridge.core.desired import claims_of_node
    from tests.catalog_builder import catalog

    snapshot = snapshot_from_services(catalog(web("backend-1", 11, [VIP6])))
    assert claims_of_node(snapshot, V6_CONFIG, "backend-1") == ((), {})


@pytest.mark.usefixtures("gue_fleet")
@pytest.mark.parametrize(("tag", "key"), [
    ("maglev.vip=[2001:DB8:10:0::10]:80/tcp", ServiceKey("2001:db8:10::10", 80, "tcp")),
    ("maglev.vip=[2001:db8:10::10]/udp", ServiceKey("2001:db8:10::10", 8080, "udp")),
    ("maglev.vip=[2001:db8:10::10]", ServiceKey("2001:db8:10::10", 8080, "tcp")),
])
def test_an_ipv6_vip_is_bracketed_and_held_in_its_canonical_form(tag, key):
    (vs,) = desired(web("b1", 11, [tag]), config=V6_CONFIG).virtual_services
    assert vs.key == key
    assert str(vs.key) == f"[2001:db8:10::10]:{key.port}/{key.protocol}"


@pytest.mark.usefixtures("gue_fleet")
@pytest.mark.parametrize(("tag", "expected"), [
    ("maglev.vip=2001:db8:10::10:80", "an IPv6 address needs brackets, as in [2001:db8::10]:80"),
    ("maglev.vip=[2001:db8:10::10:80", "expected [<ipv6>]:<port>"),
    ("maglev.vip=[2001:db8:10::10]80", "expected [<ipv6>]:<port>"),
    ("maglev.vip=[198.51.100.10]:80", "expected [<ipv6>]:<port>"),
    ("maglev.vip=[2001:db8:10::zz]:80", "'2001:db8:10::zz' is not an IPv4 or IPv6 address"),
    ("maglev.vip=[fe80::1%eth0]:80", "is not an IPv4 or IPv6 address"),
    ("maglev.vip=[2001:db8:10::10]:0", "port '0' is not a number from 1 to 65535"),
    ("maglev.vip=[2001:db8:99::10]:80", "VIP 2001:db8:99::10 is outside vip_cidrs (198.51.100.0/24, 2001:db8:10::/64)"),
])
def test_a_malformed_ipv6_vip_rejects_the_claim_saying_what_was_expected(tag, expected):
    (rej,) = desired(web("b1", 11, [tag]), config=V6_CONFIG).rejected
    assert (rej.instance, rej.tag) == ("web-b1", tag) and expected in rej.reason


@pytest.mark.usefixtures("gue_fleet")
def test_one_instance_may_claim_an_ipv4_and_an_ipv6_vip_and_ipv4_lists_first():
    d = desired(web("b1", 11, [VIP6, VIP4]), config=V6_CONFIG)
    assert [str(vs.key) for vs in d.virtual_services] == ["198.51.100.10:80/tcp", "[2001:db8:10::10]:80/tcp"]
    assert d.vip_routes == ("198.51.100.10", "2001:db8:10::10")


@pytest.mark.usefixtures("gue_fleet")
def test_each_service_takes_the_allow_prefixes_of_its_own_family():
    d = desired(web("b1", 11, [VIP4, VIP6, "maglev.allow=2001:db8:1::/48,10.0.0.0/8"]), config=V6_CONFIG)
    assert [vs.allow for vs in d.virtual_services] == [("10.0.0.0/8",), ("2001:db8:1::/48",)]


@pytest.mark.usefixtures("gue_fleet")
def test_the_whole_ipv6_space_is_no_filter_for_the_ipv6_service_only():
    d = desired(web("b1", 11, [VIP4, VIP6, "maglev.allow=::/0,10.0.0.0/8"]), config=V6_CONFIG)
    assert [vs.allow for vs in d.virtual_services] == [("10.0.0.0/8",), None]


@pytest.mark.usefixtures("gue_fleet")
@pytest.mark.parametrize(("tags_", "config", "source"), [
    ([VIP6, "maglev.allow=10.0.0.0/8"], V6_CONFIG, "the maglev.allow list (10.0.0.0/8)"),
    ([VIP6], replace(V6_CONFIG, default_allow=("0.0.0.0/0",)), "default_allow (0.0.0.0/0)"),
])
def test_a_list_without_a_prefix_of_the_vips_family_rejects_the_claim_rather_than_drop_every_client(tags_, config,
                                                                                                    source):
    (rej,) = desired(web("b1", 11, tags_), config=config).rejected
    assert rej.tag == VIP6
    assert rej.reason == (f"{source} has no IPv6 prefix, so no client could reach IPv6 VIP 2001:db8:10::10; "
                          "add IPv6 prefixes (::/0: every client)")


def test_an_ipv4_vip_with_an_ipv6_only_list_is_rejected_the_same_way():
    (rej,) = desired(web("b1", 11, [VIP4, "maglev.allow=2001:db8::/32"])).rejected
    assert "has no IPv4 prefix" in rej.reason and "(0.0.0.0/0: every client)" in rej.reason


def test_vip_cidrs_take_ipv6_prefixes_and_match_only_their_own_family():
    config = parse_config({"vip_cidrs": ["198.51.100.0/24", "2001:db8:10::/64"]})
    assert config.is_vip_allowed(ip_value("2001:db8:10::ffff"))
    assert not config.is_vip_allowed(ip_value("2001:db8:11::1"))
    assert not config.is_vip_allowed(ip_value("::c633:640a")), "198.51.100.10's number as IPv6 is not in it"
    assert config.is_vip_allowed(ip_value("198.51.100.10"))
    with pytest.raises(ConfigError, match=r"vip_cidrs\[0\]: '2001:db8::1/64' is not a network"):
        parse_config({"vip_cidrs": ["2001:db8::1/64"]})


def test_ipv6_prefixes_stay_out_of_the_tunnel_map():
    with pytest.raises(ConfigError, match=r"tunnel_map\[0\].backend: '2001:db8::/64': only IPv4"):
        parse_config({"tunnel_map": [{"backend": "2001:db8::/64", "tunnel": "2001:db9::/64"}]})


def test_allow_lists_collapse_per_family_ipv4_first_and_everyone_only_when_both_families_are_whole():
    assert collapse(parse_prefixes("2001:db8:1::/48,10.0.1.0/24,2001:db8::/48,10.0.0.0/24")) == (
        "10.0.0.0/23", "2001:db8::/47")
    assert collapse(parse_prefixes("0.0.0.0/0")) == ("0.0.0.0/0",)
    assert collapse(parse_prefixes("0.0.0.0/0,::/0")) is None
    assert for_family(("0.0.0.0/0",), 4) is None and for_family(("0.0.0.0/0",), 6) == ()
    assert parse_config({"default_allow": ["2001:db8::/32"]}).default_allow == ("2001:db8::/32",)


v6_networks = st.builds(lambda a, n: ipaddress.IPv6Network((a, n), strict=False),
                        st.integers(0, 2**128 - 1), st.integers(1, 128))
v4_networks = st.builds(lambda a, n: ipaddress.IPv4Network((a, n), strict=False),
                        st.integers(0, 2**32 - 1), st.integers(1, 32))


@given(st.lists(v6_networks | v4_networks, min_size=1, max_size=8), st.ip_addresses())
def test_a_mixed_list_admits_a_source_exactly_when_a_prefix_of_its_family_holds_it(nets, source):
    expected = any(n.version == source.version and source in n for n in nets)
    assert admits(collapse(nets), str(source)) == expected
    assert admits(for_family(collapse(nets), source.version), str(source)) == expected


@given(st.ip_addresses(v=6))
def test_every_spelling_of_an_ipv6_address_has_one_canonical_text(address):
    assert canonical_ip(address.exploded.upper()) == canonical_ip(str(address)) == str(address)


def test_keys_of_ipv6_services_and_mixed_real_servers_print_with_brackets():
    key = ServiceKey("2001:db8::10", 80, "tcp")
    assert key.text == "[2001:db8::10]:80/tcp" and key.family == 6
    assert DestKey(key, "2001:db8::1", 8080).text == "[2001:db8::10]:80/tcp>[2001:db8::1]:8080"
    assert DestKey(key, "203.0.113.11", 8080).text == "[2001:db8::10]:80/tcp>203.0.113.11:8080"
    assert DestKey.parse("[2001:DB8:0::10]:80/tcp>[2001:db8:0:0::1]:8080") == DestKey(key, "2001:db8::1", 8080)


@pytest.mark.parametrize(("text", "expected"), [
    ("2001:db8::10:80/tcp", "'2001:db8::10:80' is not <ipv4>:<port> or [<ipv6>]:<port>"),
    ("[2001:db8::10]/tcp", "no port after '[2001:db8::10]'"),
    ("[198.51.100.10]:80/tcp", "'[198.51.100.10]:80' is not <ipv4>:<port> or [<ipv6>]:<port>"),
])
def test_an_ipv6_key_that_does_not_parse_says_why(text, expected):
    with pytest.raises(ValueError, match=re.escape("expected <vip>:<port>/<tcp|udp>")) as raised:
        ServiceKey.parse(text)
    assert str(raised.value).startswith(f"{text!r}: {expected}; ")


def test_split_host_port_keeps_an_ipv4_address_and_unbrackets_an_ipv6_one():
    assert split_host_port("198.51.100.10:80") == ("198.51.100.10", ":", "80")
    assert split_host_port("[2001:db8::10]:80") == ("2001:db8::10", ":", "80")
    assert split_host_port("[2001:db8::10]") == ("2001:db8::10", "", "")


V6_SERVICE = ServiceKey("2001:db8:10::10", 80, "tcp")


@pytest.mark.parametrize(("text", "expected"), [
    ("[2001:DB8:4::1]:40000", ("2001:db8:4::1", 40000)),
    ("2001:db8:4::1", ("2001:db8:4::1", 0)),
    ("[2001:db8:4::1]", ("2001:db8:4::1", 0)),
])
def test_explain_takes_an_ipv6_client_with_or_without_a_port(text, expected):
    from bridge.inspect.explain import parse_client

    assert parse_client(text, V6_SERVICE) == expected


@pytest.mark.parametrize(("text", "key", "expected"), [
    ("203.0.113.9:40000", V6_SERVICE, "client 203.0.113.9 is IPv4 and [2001:db8:10::10]:80/tcp is IPv6"),
    ("[2001:db8:4::1]:1", ServiceKey("198.51.100.1", 80, "tcp"), "client 2001:db8:4::1 is IPv6"),
    ("[2001:db8:4::1]:70000", V6_SERVICE, "port '70000' is not a number"),
    ("2001:db8:4::1::80", V6_SERVICE, "expected <client-ip>[:<port>]"),
])
def test_explain_refuses_a_client_that_cannot_reach_the_service(text, key, expected):
    from bridge.inspect.errors import ExplainError
    from bridge.inspect.explain import parse_client

    with pytest.raises(ExplainError, match=re.escape(expected)):
        parse_client(text, key)


def test_explain_of_an_ipv6_flow_picks_as_the_kernel_port_does_and_prints_brackets():
    from bridge.core.maglev import Dest
    from bridge.inspect.explain import ServiceView, explain_flow
    from tests.maglev_reference import populate, schedule

    dests = tuple(Dest.added(a, 80, w) for a, w in [("2001:db8:3::1", 2), ("203.0.113.11", 1), ("2001:db8:3::2", 3)])
    view = ServiceView(V6_SERVICE.text, ("mh-port",), dests, source="test")
    lines, choice = explain_flow(view, "2001:db8:4::1", 40000, 251)
    assert lines[1] == "client [2001:db8:4::1]:40000"
    assert choice is not None
    picked = dests[choice.dest_index]
    assert lines[-1] == f"=> {'[' + picked.address + ']' if ':' in picked.address else picked.address}:80"
    assert schedule(dests, populate(dests, 251), "2001:db8:4::1", 40000, mh_port=True,
                    mh_fallback=False) == choice.dest_index


def test_the_backend_plans_ipv6_vips_in_address_order_after_ipv4_ones():
    from bridge.dataplane.backend import BackendLive, plan_backend

    live = BackendLive((), {6080: "gue"}, True, {})
    ops = plan_backend(["2001:db8:10::10", "198.51.100.10", "2001:db8:10::9"], live, (("gue", 6080),))
    assert [op.target for op in ops if op.kind == "add vip"] == ["198.51.100.10", "2001:db8:10::9", "2001:db8:10::10"]


def test_the_state_file_stores_ipv6_keys_in_their_text_form_and_reads_them_back(tmp_path):
    import json

    from bridge.core.memory import Memory
    from bridge.files.store import Stored, recover_state, save_state

    mixed = DestKey(V6_SERVICE, "203.0.113.11", 80)
    same = DestKey(V6_SERVICE, "2001:db8:3::1", 80)
    memory = Memory(drain_deadlines={mixed: 1700000000.5, ServiceKey("2001:db8:10::11", 53, "udp"): 1.0},
                    last_weights={mixed: 3, same: 2})
    path = tmp_path / "state.json"
    save_state(path, Stored(memory))
    assert json.loads(path.read_text())["last_weights"] == {"[2001:db8:10::10]:80/tcp>203.0.113.11:80": 3,
                                                            "[2001:db8:10::10]:80/tcp>[2001:db8:3::1]:80": 2}
    stored, warning = recover_state(path)
    assert warning is None and stored.memory == memory


def test_the_filter_names_an_ipv6_service_reversibly_and_writes_its_set_as_16_byte_intervals():
    import struct

    from bridge.dataplane.netlink_batch import parse_attrs
    from bridge.dataplane.nft import object_id, parse_table
    from bridge.dataplane.nft_netlink import interval_elements

    ident = object_id(V6_SERVICE)
    assert ident == "20010db8001000000000000000000010_tcp_80"
    listing = [{"table": {}}, {"chain": {"name": "input"}},
               {"set": {"name": f"allow_{ident}", "elem": [{"prefix": {"addr": "2001:db8:4::", "len": 48}},
                                                         "2001:db8:5::1"]}},
               {"counter": {"name": f"drop_{ident}", "packets": 4}},
               {"rule": {"chain": "input", "handle": 7, "comment": f"maglev-bridge {V6_SERVICE}"}}]
    (entry,) = parse_table(listing).allows
    assert (entry.key, entry.prefixes, entry.rule, entry.drops) == (
        V6_SERVICE, ("2001:db8:4::/48", "2001:db8:5::1/128"), 7, 4)

    def decoded(element: bytes) -> tuple[str, int, bytes]:
        attrs = parse_attrs(element, 4, len(element))
        key = parse_attrs(attrs[1], 0, len(attrs[1]))[1]
        return socket.inet_ntop(socket.AF_INET6, key), int.from_bytes(attrs.get(3, bytes(4)), "big"), attrs.get(6, b"")

    open_end = struct.pack("=BBI", 1, 4, 1)
    assert [decoded(e) for e in interval_elements(("ff00::/8", "2001:db8:4::/48"))] == [
        ("::", 1, b""), ("2001:db8:4::", 0, b""), ("2001:db8:5::", 1, b""), ("ff00::", 0, open_end)]


@pytest.mark.usefixtures("gue_fleet")
def test_plan_prints_ipv6_services_and_real_servers_in_brackets():
    from bridge.inspect.text import desired_text

    text = desired_text(desired(web("b1", 11, [VIP6]), config=V6_CONFIG))
    assert text.splitlines()[0].startswith("[2001:db8:10::10]:80/tcp  service web")


def test_status_prints_ipv6_services_real_servers_and_routes_in_their_own_forms():
    from bridge.core.live import LiveRealServer, LiveRoute, LiveService, LiveState
    from bridge.inspect.text import status_json, status_text

    servers = (LiveRealServer("2001:db8:3::1", 80, 2), LiveRealServer("203.0.113.11", 80, 1))
    live = LiveState(services=(LiveService("2001:db8:10::10", 80, "tcp", "mh", ("mh-port",), servers),),
                     routes=(LiveRoute("2001:db8:10::10", "local", "lo"),))
    lines = status_text(status_json(live, {}, {})).splitlines()
    assert lines[1].startswith("[2001:db8:10::10]:80/tcp ")
    assert lines[2].startswith("    -> [2001:db8:3::1]:80 ") and lines[3].startswith("    -> 203.0.113.11:80 ")
    assert "2001:db8:10::10/128 local  lo" in lines


def test_plan_lists_an_ipv6_claim_of_a_fou_fleet_as_rejected_saying_it_needs_gue(tmp_path, capsys):
    import json

    from bridge.cli.main import main
    from tests.catalog_builder import catalog

    (tmp_path / "catalog.json").write_text(json.dumps(catalog(web("b1", 11, [VIP4]), web("b2", 12, [VIP6]))))
    (tmp_path / "c.yaml").write_text("vip_cidrs: [198.51.100.0/24, '2001:db8:10::/64']\n"
                                     "tunnel_map: [{backend: 192.0.2.0/25, tunnel: 203.0.113.0/25}]\n")
    assert main(["plan", "--config", str(tmp_path / "c.yaml"), "--catalog", str(tmp_path / "catalog.json")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("198.51.100.10:80/tcp  service web")
    assert (f"REJECTED service web instance web-b2 tag '{VIP6}': IPv6 VIPs need encapsulation: gue "
            "(ipip+fou tunnels carry IPv4 only)") in out
