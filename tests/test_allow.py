"""The allow tag and the allow list of a virtual service (bridge/core: allow.py, tags.py, desired.py)."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.core.allow import admits, collapse, parse_prefixes
from bridge.core.config import ConfigError, parse_config
from tests.harness.desired import CONFIG, desired, web

VIP = "maglev.vip=198.51.100.10:80"


def test_a_service_without_allow_tags_accepts_everyone_by_default():
    (vs,) = desired(web("b1", 11, [VIP])).virtual_services
    assert vs.allow is None


def test_allow_tags_add_up_and_are_merged_and_sorted():
    (vs,) = desired(web("b1", 11, [VIP, "maglev.allow=203.0.113.0/25,10.0.0.0/8",
                                   "maglev.allow=203.0.113.128/25"])).virtual_services
    assert vs.allow == ("10.0.0.0/8", "203.0.113.0/24")


def test_the_earliest_instance_decides_the_list_whatever_the_others_tag():
    d = desired(web("b1", 11, [VIP, "maglev.allow=10.0.0.0/8"], create_index=20),
                web("b2", 12, [VIP, "maglev.allow=192.0.2.0/24"], create_index=10),
                web("b3", 13, [VIP], create_index=30))
    assert d.virtual_services[0].allow == ("192.0.2.0/24",)


def test_a_list_covering_everything_is_no_filter():
    (vs,) = desired(web("b1", 11, [VIP, "maglev.allow=0.0.0.0/1,128.0.0.0/1"])).virtual_services
    assert vs.allow is None


def test_default_allow_applies_to_instances_without_allow_tags():
    config = replace(CONFIG, default_allow=("192.0.2.0/24",))
    d = desired(web("b1", 11, [VIP]), config=config)
    assert d.virtual_services[0].allow == ("192.0.2.0/24",)


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("maglev.allow=10.0.0.1/8", "'10.0.0.1/8' is not a prefix in CIDR form"),
        ("maglev.allow=10.0.0.0/33", "'10.0.0.0/33' is not a prefix"),
        ("maglev.allow=", "got nothing"),
        ("maglev.allow=10.0.0.0/8,", "empty prefix"),
        ("maglev.allow=2001:db8::1/32", "'2001:db8::1/32' is not a prefix in CIDR form"),
        ("maglev.allow=web", "'web' is not a prefix"),
    ],
)
def test_malformed_allow_rejects_that_instances_claim_only(tag, expected):
    d = desired(web("b1", 11, [VIP, tag]), web("b2", 12, [VIP, "maglev.allow=192.0.2.0/24"]))
    (rej,) = d.rejected
    assert (rej.service, rej.instance, rej.tag) == ("web", "web-b1", tag)
    assert expected in rej.reason and "expected <cidr>[,<cidr>...]" in rej.reason
    (vs,) = d.virtual_services
    assert [rs.backend for rs in vs.real_servers] == ["192.0.2.12"] and vs.allow == ("192.0.2.0/24",)


@pytest.mark.parametrize(("value", "expected"), [([], "got nothing"), (["10.0.0.1/8"], "not a prefix"),
                                                 ("10.0.0.0/8", "expected a list")])
def test_default_allow_is_checked_at_load(value, expected):
    with pytest.raises(ConfigError, match="default_allow") as err:
        parse_config({"default_allow": value})
    assert expected in str(err.value)


def test_default_allow_null_is_everyone_and_a_list_is_collapsed():
    assert parse_config({"default_allow": None}).default_allow is None
    assert parse_config({"default_allow": ["10.0.1.0/24", "10.0.0.0/24"]}).default_allow == ("10.0.0.0/23",)


networks = st.builds(lambda a, n: ipaddress.IPv4Network((a, n), strict=False),
                     st.integers(0, 2**32 - 1), st.integers(1, 32))


@given(st.lists(networks, min_size=1, max_size=8), st.integers(0, 2**32 - 1))
def test_the_collapsed_list_admits_exactly_the_sources_of_the_tagged_prefixes(nets, source):
    address = ipaddress.IPv4Address(source)
    assert admits(collapse(nets), str(address)) == any(address in n for n in nets)


@given(st.lists(networks, min_size=1, max_size=8))
def test_the_list_does_not_depend_on_tag_order(nets):
    text = ",".join(map(str, nets))
    assert collapse(parse_prefixes(text)) == collapse(parse_prefixes(",".join(map(str, reversed(nets)))))
