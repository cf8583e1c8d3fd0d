from __future__ import annotations

import json
from dataclasses import replace

import msgspec
import pytest

from bridge.core.keys import ServiceKey
from bridge.core.maglev import Dest
from bridge.inspect.discover import Director, Discovery, discovery_text, read_report
from bridge.inspect.errors import ExplainError
from bridge.inspect.explain import ServiceView, explain_flow, explain_shares, parse_client, parse_service


def view(flags=("mh-fallback", "mh-port"), weights=(1, 1, 2)):
    dests = tuple(Dest.added(f"203.0.113.{117 + i}", 80, w) for i, w in enumerate(weights))
    return ServiceView("198.51.100.1:80/tcp", flags, dests, {d.address: f"192.0.2.{21 + i}" for i, d in
                                                               enumerate(dests)}, source="test")


def test_explain_names_slot_owner_and_backend():
    lines, choice = explain_flow(view(), "203.0.113.11", 40000, 4093)
    assert choice is not None and choice.fallback_hops == 0
    assert lines[-1].startswith("=> 203.0.113.") and "(backend 192.0.2." in lines[-1]


def test_explain_shows_fallback_for_an_unavailable_owner_and_a_drop_without_fallback():
    drained = view()
    lines, first = explain_flow(drained, "203.0.113.11", 40000, 4093)
    owner = first.dest_index
    dests = tuple(d.with_weight(0) if i == owner else d for i, d in enumerate(drained.dests))
    lines, choice = explain_flow(ServiceView(drained.label, drained.flags, dests, drained.backends), "203.0.113.11",
                                 40000, 4093)
    assert choice is not None and choice.dest_index != owner and choice.fallback_hops >= 1
    assert any(line.startswith("mh-fallback:") for line in lines) and "unavailable" in lines[2]
    lines, choice = explain_flow(ServiceView(drained.label, ("mh-port",), dests, drained.backends), "203.0.113.11",
                                 40000, 4093)
    assert choice is None and lines[-1] == "=> dropped (no mh-fallback)"


def test_without_mh_port_the_source_port_is_not_hashed():
    one, _ = explain_flow(view(flags=()), "203.0.113.11", 1, 4093)
    two, _ = explain_flow(view(flags=()), "203.0.113.11", 2, 4093)
    assert one[2:] == two[2:] and "not hashed" in one[1]


def test_explain_says_a_source_outside_the_allow_list_is_filtered_before_maglev():
    web_view = replace(view(), allow=("192.0.2.0/24",), service="web")
    lines, choice = explain_flow(web_view, "198.51.100.9", 40000, 4093)
    assert choice is None
    assert lines[2].startswith("source 198.51.100.9 is not in web's allow list (192.0.2.0/24)")
    assert lines[-1] == "=> dropped by the filter (table inet maglev_bridge), source 198.51.100.9"
    allowed, choice = explain_flow(web_view, "192.0.2.9", 40000, 4093)
    assert choice is not None and not any("allow list" in line for line in allowed)


def test_shares_report_the_worst_gap_between_table_and_weight():
    lines = explain_shares(view(weights=(1, 1000)), 251)
    assert "worst gap" in lines[-1] and "fingerprint" in lines[0]


WEB = ServiceKey("198.51.100.1", 80, "tcp")


@pytest.mark.parametrize(("text", "parse"), [("198.51.100.1", parse_service), ("x:80", parse_service),
                                              ("198.51.100.1:80/sctp", parse_service),
                                              ("1.2.3:4", lambda text: parse_client(text, WEB))])
def test_explain_arguments_are_checked(text, parse):
    with pytest.raises(ExplainError):
        parse(text)


def test_discovery_flags_directors_whose_tables_differ_and_shows_each_ones_version():
    def status(fp, version):
        return read_report(json.dumps({"agent": {"role": "director", "ready": True, "version": version},
                                       "virtual_services": [{"vip": "198.51.100.1", "port": 80, "protocol": "tcp",
                                                             "fingerprint": fp, "real_servers": [{}, {}]}]}))
    found = Discovery([Director("192.0.2.11", 9119, status("aa", "0.1.0")),
                       Director("192.0.2.12", 9119, status("bb", "0.2.0")),
                       Director("192.0.2.13", 9119, error="connection refused")])
    for d in found.directors:
        for vs in d.status.virtual_services if d.status else ():
            found.fingerprints["198.51.100.1:80/tcp"][d.label] = vs.fingerprint
    text = discovery_text(found)
    assert found.disagreeing == ["198.51.100.1:80/tcp"]
    assert text.count("NO: tables differ") == 2 and "DOWN" in text
    assert [line.split()[2] for line in text.splitlines()[1:3]] == ["0.1.0", "0.2.0"]


def test_discovery_shows_a_director_in_maintenance_with_its_reason():
    agent = {"role": "director", "ready": True,
             "maintenance": {"on": True, "reason": "kernel upgrade", "since": 0.0, "by": "ops@lb1"}}
    found = Discovery([Director("192.0.2.11", 9119, read_report(json.dumps({"agent": agent, "virtual_services": []})))])
    text = discovery_text(found)
    assert "maint" in text.splitlines()[1]
    assert "maintenance: 192.0.2.11:9119 on (kernel upgrade, since ?, by ops@lb1)" in text


def test_a_status_answer_of_the_wrong_shape_is_named_by_its_field_and_unknown_fields_are_ignored():
    """Another director's /status is data from the network: the field that does not fit is named; what a newer
    agent adds is ignored."""
    with pytest.raises(msgspec.ValidationError, match=r"\$\.virtual_services\[0\]\.port"):
        read_report(b'{"virtual_services": [{"vip": "198.51.100.1", "port": "80", "protocol": "tcp"}]}')
    newer = read_report(b'{"agent": {"role": "director", "later": 1}, "virtual_services": [], "more": {}}')
    assert newer.agent.role == "director" and newer.virtual_services == ()

