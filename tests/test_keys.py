"""Typed keys: each is the one place its text form is written and read back."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.core.keys import DestKey, ServiceKey, dest_key_parser

addresses = st.ip_addresses().map(str)
"""Both families: IPv6 VIPs and real servers, and an IPv6 VIP with IPv4 real servers (tunnel forwarding)."""
ports = st.integers(1, 65535)
services = st.builds(ServiceKey, addresses, ports, st.sampled_from(["tcp", "udp"]))
dests = st.builds(DestKey, services, addresses, ports)


def test_keys_print_as_every_output_always_wrote_them():
    key = ServiceKey("198.51.100.10", 80, "tcp")
    assert (str(key), key.text, f"{key}") == ("198.51.100.10:80/tcp",) * 3
    dest = DestKey(key, "203.0.113.11", 8080)
    assert (str(dest), dest.text) == ("198.51.100.10:80/tcp>203.0.113.11:8080",) * 2


@given(services)
def test_a_service_key_reads_back_from_its_text(key):
    assert ServiceKey.parse(key.text) == key


@given(dests)
def test_a_real_server_key_reads_back_from_its_text(key):
    assert DestKey.parse(key.text) == key


@given(st.lists(st.builds(DestKey, st.sampled_from([ServiceKey("198.51.100.10", 80, "tcp")]) | services,
                          st.sampled_from(["203.0.113.11"]) | addresses, st.sampled_from([80]) | ports)))
def test_a_batch_of_real_server_keys_whose_parts_repeat_reads_back_as_each_key_alone(keys):
    parse = dest_key_parser()
    assert [parse(key.text) for key in keys] == [DestKey.parse(key.text) for key in keys] == keys


@given(st.lists(services))
def test_keys_sort_as_the_tuples_they_replaced_and_list_by_numeric_vip(keys):
    assert sorted(keys) == sorted(keys, key=tuple)
    assert sorted(keys, key=ServiceKey.listing_order) == sorted(
        keys, key=lambda k: (ipaddress.ip_address(k.vip).version, int(ipaddress.ip_address(k.vip)), k.port, k.protocol))


SERVICE_FORM = "<vip>:<port>/<tcp|udp> (IPv6 in brackets: [2001:db8::10]:80/tcp)"
DEST_FORM = "<vip>:<port>/<tcp|udp>><address>:<port> (IPv6 in brackets: [2001:db8::10]:80/tcp>[2001:db8::1]:80)"


@pytest.mark.parametrize(("parse", "text", "expected", "form"), [
    (ServiceKey.parse, "198.51.100.10:80", "no protocol after '198.51.100.10:80'", SERVICE_FORM),
    (ServiceKey.parse, "198.51.100.10/tcp", "no port after '198.51.100.10'", SERVICE_FORM),
    (ServiceKey.parse, "198.51.100.300:80/tcp", "'198.51.100.300' is not an IPv4 or IPv6 address", SERVICE_FORM),
    (ServiceKey.parse, "198.51.100.10:0/tcp", "port '0' is not a number from 1 to 65535", SERVICE_FORM),
    (ServiceKey.parse, "198.51.100.10:\uff18\uff10/tcp", "port '\uff18\uff10' is not a number from 1 to 65535",
     SERVICE_FORM),
    (ServiceKey.parse, "198.51.100.10:80/sctp", "protocol 'sctp' is not tcp or udp", SERVICE_FORM),
    (DestKey.parse, "198.51.100.10:80/tcp 203.0.113.11:80", "no '>' between virtual service and real server",
     DEST_FORM),
    (DestKey.parse, "198.51.100.10:80>203.0.113.11:80", "no protocol after '198.51.100.10:80'", DEST_FORM),
    (DestKey.parse, "198.51.100.10:80/tcp>203.0.113.11", "no port after '203.0.113.11'", DEST_FORM),
    (DestKey.parse, "198.51.100.10:80/tcp>host:80", "'host' is not an IPv4 or IPv6 address", DEST_FORM),
])
def test_a_key_that_does_not_parse_names_the_whole_text_what_is_wrong_and_what_was_expected(parse, text, expected,
                                                                                             form):
    with pytest.raises(ValueError) as raised:
        parse(text)
    assert str(raised.value) == f"{text!r}: {expected}; expected {form}"


@pytest.mark.parametrize("text", ["198.51.100.10:80/tcp 203.0.113.11:80", "198.51.100.10:80/tcp>203.0.113.11:80>1",
                                  "198.51.100.10:80/tcp>>203.0.113.11:80", "198.51.100.10:80/tcp"])
def test_a_batch_parser_refuses_what_parse_refuses_even_after_it_has_seen_the_parts(text):
    parse = dest_key_parser()
    parse("198.51.100.10:80/tcp>203.0.113.11:80")
    with pytest.raises(ValueError) as alone:
        DestKey.parse(text)
    with pytest.raises(ValueError) as batched:
        parse(text)
    assert str(batched.value) == str(alone.value)


def test_explain_may_leave_the_protocol_out():
    assert ServiceKey.parse("198.51.100.10:53", default_protocol="udp") == ServiceKey("198.51.100.10", 53, "udp")
