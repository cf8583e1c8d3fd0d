"""The catalog boundary: whatever a catalog entry or a tag holds, it is accepted or rejected alone, with a
reason naming service, instance and field; it never raises past the boundary and never changes another
service's desired state. Examples first, then properties over arbitrary JSON and arbitrary Unicode."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.catalog.consul_format import CatalogFormatError, parse_catalog, parse_service
from bridge.core.desired import compute_desired
from bridge.core.model import Snapshot
from bridge.core.printable import printable
from bridge.inspect.text import desired_text, dumps
from tests.catalog_builder import catalog, health_entry
from tests.harness.desired import CONFIG

WEB = health_entry("web", "b1", "192.0.2.11", 80, ["maglev.vip=198.51.100.10:80"], create_index=5)
POISON_TAGS = ["maglev.vip=198.51.100.20:80"]


def poison(**changes: Any) -> dict[str, Any]:
    return health_entry("poison", "b2", "192.0.2.12", 80, list(POISON_TAGS), create_index=6, **changes)


def snapshot(*poisoned: Any) -> Snapshot:
    """The web service, and the poison service listing `poisoned` (any JSON at all)."""
    return parse_catalog(json.dumps({"web": [WEB], "poison": list(poisoned)}))


def web_state(snap: Snapshot) -> Any:
    desired = compute_desired(snap, CONFIG, "192.0.2.1")
    return [vs for vs in desired.virtual_services if vs.service == "web"]


BASELINE = web_state(snapshot())


def with_field(entry: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(entry)
    target: Any = changed
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return changed


@pytest.mark.parametrize(("path", "value", "reason"), [
    (("Node",), None, "field Node: expected `object`, got `null`"),
    (("Service",), [], "field Service: expected `object`, got `array`"),
    (("Service", "Port"), "80", "field Service.Port: expected `int`, got `str`"),
    (("Service", "Port"), True, "field Service.Port: expected `int`, got `bool`"),
    (("Service", "Port"), 80.0, "field Service.Port: expected `int`, got `float`"),
    (("Service", "Port"), 65536, "field Service.Port: expected `int` <= 65535"),
    (("Service", "CreateIndex"), -1, "field Service.CreateIndex: expected `int` >= 0"),
    (("Service", "CreateIndex"), None, "field Service.CreateIndex: expected `int`, got `null`"),
    (("Service", "Tags"), "maglev.vip=198.51.100.20:80", "field Service.Tags: expected `array | null`, got `str`"),
    (("Service", "Tags"), ["maglev.vip=198.51.100.20:80", 7], "field Service.Tags[1]: expected `str`, got `int`"),
    (("Checks",), [None], "field Checks[0]: expected `object`, got `null`"),
    (("Checks",), {"Status": "passing"}, "field Checks: expected `array | null`, got `object`"),
    (("Service", "Service"), "web", "field Service.Service: expected 'poison'"),
])
def test_an_entry_of_the_wrong_shape_is_rejected_alone_naming_instance_and_field(path, value, reason):
    snap = snapshot(with_field(poison(), path, value))
    (rejection,) = snap.rejected
    named = "#0" if path == ("Service",) else "poison-b2"  # without a Service object: its position
    assert (rejection.service, rejection.instance, rejection.tag) == ("poison", named, "")
    assert rejection.reason.startswith(reason)
    assert [i.service for i in snap.instances] == ["web"]
    assert web_state(snap) == BASELINE
    assert compute_desired(snap, CONFIG, "192.0.2.1").rejected == snap.rejected


def test_go_style_nulls_for_empty_lists_are_accepted():
    snap = snapshot(with_field(with_field(poison(), ("Service", "Tags"), None), ("Checks",), None))
    assert snap.rejected == () and snap.instances[0].tags == () and snap.instances[0].health == "passing"


def test_an_entry_without_a_usable_id_is_named_by_its_position():
    snap = snapshot(with_field(poison(), ("Service",), None))
    assert [(r.service, r.instance) for r in snap.rejected] == [("poison", "#0")]


def test_a_service_that_is_not_an_array_is_rejected_whole_and_the_rest_goes_on():
    snap = parse_catalog(json.dumps({"web": [WEB], "poison": {"oops": 1}}))
    assert [(r.service, r.instance) for r in snap.rejected] == [("poison", "*")]
    assert web_state(snap) == BASELINE


@pytest.mark.parametrize("text", ["", "[1, 2", "[]", '"web"'])
def test_only_a_document_that_is_not_a_catalog_at_all_stops_the_file(text):
    with pytest.raises(CatalogFormatError, match="catalog"):
        parse_catalog(text)


def test_one_service_answer_from_consul_goes_through_the_same_schema():
    snap = parse_service("poison", json.dumps([poison(), with_field(poison(instance_id="p2"), ("Node",), 3)]))
    assert [i.instance_id for i in snap.instances] == ["poison-b2"]
    assert [(r.instance, r.reason) for r in snap.rejected] == [("p2", "field Node: expected `object`, got `int`")]


@pytest.mark.parametrize(("tag", "expected"), [
    ("maglev.weight=²", "weight '²' is not an integer from 0 to 65535"),
    ("maglev.weight=٣", "weight '٣' is not an integer from 0 to 65535"),
    ("maglev.weight=" + "9" * 5000, "is not an integer from 0 to 65535"),
    ("maglev.vip=198.51.100.20:\uff18\uff10", "port '\uff18\uff10' is not a number from 1 to 65535"),
    ("maglev.vip=198.51.100.20:" + "1" * 5000, "is not a number from 1 to 65535"),
    ("maglev.vip=١٩٨.51.100.20:80", "is not an IPv4 or IPv6 address"),
    ("maglev.flags=mh-port,\x1b[31m", "unknown flag(s) '\\x1b[31m'"),
    ("maglev.we\x00ight=1", "unknown key 'we\\x00ight'"),
])
def test_tags_with_any_unicode_are_clean_rejections_naming_the_instance(tag, expected):
    snap = snapshot(with_field(poison(), ("Service", "Tags"), [*POISON_TAGS, tag]))
    desired = compute_desired(snap, CONFIG, "192.0.2.1")
    (rejection,) = desired.rejected
    assert (rejection.service, rejection.instance, rejection.tag) == ("poison", "poison-b2", tag)
    assert expected in rejection.reason
    assert web_state(snap) == BASELINE
    assert printable(rejection.reason, 10_000).isprintable()


def test_names_and_tags_are_escaped_in_text_output():
    evil = health_entry("we\x1b]0;pwned\x07b", "node\nFAKE LOG LINE", "192.0.2.13", 80,
                        ["maglev.vip=198.51.100.30:80", "maglev.weight=\u202e1"])
    good = health_entry("we\x1b]0;pwned\x07b", "node\r", "192.0.2.14", 80, ["maglev.vip=198.51.100.30:80"],
                        instance_id="ok\u202e")
    text = desired_text(compute_desired(parse_catalog(json.dumps(catalog(evil, good))), CONFIG, "192.0.2.1"))
    assert "service we\\x1b]0;pwned\\x07b" in text and "(node\\x0d)" in text
    assert "instance we\\x1b]0;pwned\\x07b-node\\x0aFAKE LOG LINE" in text
    assert all(line.isprintable() for line in text.splitlines())


def test_a_large_json_answer_is_one_line_of_the_same_data_and_escapes_names_as_json_does():
    rows = [{"service": f"web-{i}", "node": "node-1", "weight": i, "allow": None} for i in range(20_000)]
    plain = dumps({"virtual_services": rows})
    assert len(plain) > 1_000_000 and "\n" not in plain and json.loads(plain) == {"virtual_services": rows}
    evil = {"virtual_services": [*rows, {"service": "we\x1b]0;pwned\x07b", "node": "ok\u202e\n"}]}
    escaped = dumps(evil)
    assert escaped.isascii() and escaped == json.dumps(evil)
    assert dumps({"small": "ok\u202e"}) == json.dumps({"small": "ok\u202e"}, indent=2)


def test_printable_cuts_long_names_and_says_how_long_they_were():
    assert printable("x" * 300) == "x" * 200 + "...(300 characters)"
    assert printable("plain-name") == "plain-name"


# ---- properties --------------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FIELDS = [("Node",), ("Node", "Node"), ("Node", "Address"), ("Service",), ("Service", "ID"), ("Service", "Service"),
          ("Service", "Tags"), ("Service", "Address"), ("Service", "Port"), ("Service", "CreateIndex"), ("Checks",),
          ("Checks", 0), ("Checks", 1, "Status")]


def _accepted_or_named(snap: Snapshot, desired_rejected: Any, instance: str) -> bool:
    if any(i.service == "poison" for i in snap.instances):
        return True
    return any(r.service == "poison" and r.instance in (instance, "#0") for r in desired_rejected)


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(path=st.sampled_from(FIELDS), value=JSON)
def test_arbitrary_json_in_any_field_is_accepted_or_rejected_alone(path, value):
    entry = with_field(poison(), path, value)
    snap = snapshot(entry)
    desired = compute_desired(snap, CONFIG, "192.0.2.1")
    assert web_state(snap) == BASELINE
    ident = entry["Service"].get("ID") if isinstance(entry.get("Service"), dict) else None
    assert _accepted_or_named(snap, desired.rejected, ident if isinstance(ident, str) and ident else "#0")
    assert all(line.isprintable() for line in desired_text(desired).splitlines())


TAG_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=30) | st.from_regex("[0-9²٣\uff18]{0,12}",
                                                                                        fullmatch=True)
OUR_TAGS = st.builds(lambda key, value: f"maglev.{key}={value}",
                     st.sampled_from(["vip", "weight", "flags"]) | st.text(max_size=6),
                     TAG_TEXT | st.builds(lambda port: f"198.51.100.20:{port}", TAG_TEXT))
TAGS = st.lists(OUR_TAGS | TAG_TEXT | st.builds(lambda s: "maglev." + s, TAG_TEXT), max_size=4)


@PROPERTY
@given(tags=TAGS)
def test_arbitrary_unicode_tags_never_raise_and_never_touch_another_service(tags):
    entry = with_field(poison(), ("Service", "Tags"), [*POISON_TAGS, *tags])
    snap = snapshot(entry)
    desired = compute_desired(snap, CONFIG, "192.0.2.1")
    assert web_state(snap) == BASELINE
    claimed = any(vs.service == "poison" for vs in desired.virtual_services)
    named = [r for r in desired.rejected if (r.service, r.instance) == ("poison", "poison-b2")]
    assert claimed != bool(named), "the instance's claim is either accepted whole or rejected with its name"
    assert all(line.isprintable() for line in desired_text(desired).splitlines())


@PROPERTY
@given(answer=st.lists(JSON | st.just(poison()), max_size=4) | JSON)
def test_any_json_answer_from_consul_becomes_instances_and_rejections_of_that_service_only(answer):
    snap = parse_service("poison", json.dumps(answer))
    assert {i.service for i in snap.instances} <= {"poison"}
    assert {r.service for r in snap.rejected} <= {"poison"}
    expected = len(answer) if isinstance(answer, list) else 1  # one rejection for an answer that is no array
    assert len(snap.instances) + len(snap.rejected) == expected, "every entry is accepted or rejected, alone"
