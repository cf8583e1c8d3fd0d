"""Planning the director's packet filter (bridge/core/filter.py) and its nftables form
(bridge/dataplane/nft.py), without a kernel: the real table is checked in tests/kernel/test_filter.py."""

from __future__ import annotations

import socket
import struct
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.core.filter import plan_filter
from bridge.core.keys import ServiceKey
from bridge.core.live import LiveAllow, LiveFilter, LiveState
from bridge.core.memory import Memory
from bridge.core.model import DesiredState, VirtualService
from bridge.core.ops import (
    AddAllow,
    AddRoute,
    AddService,
    ChangeAllow,
    CreateFilter,
    DelAllow,
    DelService,
    FilterOp,
)
from bridge.core.plan import plan
from bridge.dataplane import nft_netlink
from bridge.dataplane.netlink_batch import parse_attrs
from bridge.dataplane.nft import object_id, parse_table
from bridge.dataplane.nft_netlink import interval_elements, messages
from bridge.dataplane.shadow import ShadowKernel

WEB = ServiceKey("198.51.100.10", 80, "tcp")
DNS = ServiceKey("198.51.100.10", 53, "udp")


def vs(key, allow):
    return VirtualService(key[0], key[1], key[2], "mh", (), "web", (), allow)


def state(*services):
    return DesiredState(tuple(services), (), (), ())


def applied(desired, live=None):
    """The live state after planning and carrying out the plan in the model kernel."""
    live = live or LiveState()
    kernel = ShadowKernel(live)
    list(kernel.apply(plan(desired, live, Memory(), 0.0, 30).ops))
    return kernel.read()


def test_a_first_list_creates_the_table_then_the_entry_before_the_service():
    ops = [op for op in plan(state(vs(WEB, ("192.0.2.0/24",))), LiveState(), Memory(), 0.0, 30).ops
           if not isinstance(op, AddRoute)]
    assert ops == [CreateFilter(), AddAllow(WEB, ("192.0.2.0/24",)), AddService(WEB, "mh", ())]


def test_services_without_a_list_create_no_table():
    ops = plan(state(vs(WEB, None)), LiveState(), Memory(), 0.0, 30).ops
    assert not any(isinstance(op, CreateFilter | AddAllow) for op in ops)


def test_an_unchanged_catalog_plans_nothing():
    desired = state(vs(WEB, ("192.0.2.0/24",)), vs(DNS, None))
    assert plan(desired, applied(desired), Memory(), 0.0, 30).ops == ()


def test_a_changed_list_refills_that_set_only():
    live = applied(state(vs(WEB, ("192.0.2.0/24",)), vs(DNS, ("10.0.0.0/8",))))
    ops = plan(state(vs(WEB, ("192.0.2.0/25",)), vs(DNS, ("10.0.0.0/8",))), live, Memory(), 0.0, 30).ops
    assert ops == (ChangeAllow(WEB, ("192.0.2.0/25",), ("192.0.2.0/24",)),)
    assert ops[0].describe() == "filter 198.51.100.10:80/tcp: allow list +192.0.2.0/25 -192.0.2.0/24"


def test_a_list_dropped_from_the_tags_removes_the_entry_and_keeps_the_table():
    live = applied(state(vs(WEB, ("192.0.2.0/24",))))
    assert plan(state(vs(WEB, None)), live, Memory(), 0.0, 30).ops == (DelAllow(WEB, 1, True, True),)
    assert applied(state(vs(WEB, None)), live).filter == LiveFilter(True, ())


def test_a_draining_service_keeps_its_list_until_it_is_deleted():
    live = applied(state(vs(WEB, ("192.0.2.0/24",))))
    draining = plan(state(), live, Memory(), 0.0, 30)
    assert not any(isinstance(op, DelAllow) for op in draining.ops)
    expired = plan(state(), live, Memory(draining.drain_deadlines), 31.0, 30).ops
    assert DelAllow(WEB, 1, True, True) in expired and DelService(WEB) in expired


def test_a_broken_entry_is_rebuilt_whole():
    live = LiveFilter(True, (LiveAllow(WEB, ("192.0.2.0/24",), None, True),))
    assert plan_filter([vs(WEB, ("192.0.2.0/24",))], live, {WEB}) == [
        DelAllow(WEB, None, True, True), AddAllow(WEB, ("192.0.2.0/24",))]


def test_a_scoped_plan_leaves_entries_outside_its_scope_alone():
    live = LiveFilter(True, (LiveAllow(DNS, ("10.0.0.0/8",), 7, True),))
    assert plan_filter([vs(WEB, ("192.0.2.0/24",))], live, set(), scope={WEB}) == [AddAllow(WEB, ("192.0.2.0/24",))]


def test_a_prefix_is_written_as_its_first_address_and_the_address_after_its_last_one():
    """As libnftables writes an interval set: an end at 0.0.0.0 first (no prefix starts there), addresses in
    order, and a prefix reaching the last address marked open instead of ended."""
    def decoded(element: bytes) -> tuple[str, int, bytes]:
        attrs = parse_attrs(element, 4, len(element))
        key = parse_attrs(attrs[1], 0, len(attrs[1]))[1]
        return socket.inet_ntoa(key), int.from_bytes(attrs.get(3, bytes(4)), "big"), attrs.get(6, b"")

    open_end = struct.pack("=BBI", 1, 4, 1)
    assert [decoded(e) for e in interval_elements(("240.0.0.0/4", "192.0.2.7/32", "10.0.0.0/8"))] == [
        ("0.0.0.0", 1, b""), ("10.0.0.0", 0, b""), ("11.0.0.0", 1, b""), ("192.0.2.7", 0, b""),
        ("192.0.2.8", 1, b""), ("240.0.0.0", 0, open_end)]
    assert [decoded(e) for e in interval_elements(("0.0.0.0/0",))] == [("0.0.0.0", 0, open_end)]


def test_a_service_is_added_counter_and_set_before_the_rule_using_them_and_removed_in_reverse():
    def kinds(op: FilterOp) -> list[int]:
        return [m.kind for m in messages(op, "maglev_bridge", "input", "maglev-bridge", object_id(WEB), "web")]

    assert kinds(CreateFilter()) == [nft_netlink.NEWTABLE, nft_netlink.NEWCHAIN]
    assert kinds(AddAllow(WEB, ("192.0.2.0/24",))) == [
        nft_netlink.NEWOBJ, nft_netlink.NEWSET, nft_netlink.NEWSETELEM, nft_netlink.NEWRULE]
    assert kinds(ChangeAllow(WEB, ("192.0.2.0/24",), ("10.0.0.0/8",))) == [
        nft_netlink.DELSETELEM, nft_netlink.NEWSETELEM], "the set is flushed and refilled, nothing else"
    assert kinds(DelAllow(WEB, 4, True, True)) == [nft_netlink.DELRULE, nft_netlink.DELSET, nft_netlink.DELOBJ]
    assert kinds(DelAllow(WEB, None, True, False)) == [nft_netlink.DELSET]


def test_foreign_objects_in_the_table_are_not_read_as_the_agents():
    objects = [{"table": {}}, {"chain": {"name": "input"}}, {"set": {"name": "operators", "elem": []}},
               {"rule": {"chain": "input", "handle": 9, "comment": "ssh"}}]
    assert parse_table(objects) == LiveFilter(True, ())


def test_object_names_are_reversible_and_short():
    assert object_id(WEB) == "c633640a_tcp_80" and object_id(replace(vs(DNS, None)).key) == "c633640a_udp_53"


def test_plan_and_status_show_the_filter():
    from bridge.inspect.text import desired_json, desired_text, status_json, status_text

    desired = state(vs(WEB, ("192.0.2.0/24",)), vs(DNS, None))
    assert "allow 192.0.2.0/24" in desired_text(desired).splitlines()[0]
    assert [v["allow"] for v in desired_json(desired)["virtual_services"]] == [["192.0.2.0/24"], None]
    live = LiveState(filter=LiveFilter(True, (LiveAllow(WEB, ("192.0.2.0/24",), 4, True, 12),)))
    text = status_text(status_json(live, {}, {}))
    assert "filter (table inet maglev_bridge): 1 allow list(s)" in text
    assert "198.51.100.10:80/tcp   allow 192.0.2.0/24  dropped 12 packet(s)" in text


prefix_lists = st.one_of(st.none(), st.lists(st.sampled_from(
    ["192.0.2.0/24", "192.0.2.0/25", "10.0.0.0/8", "203.0.113.7/32", "198.18.0.0/15"]), min_size=1, max_size=3)
    .map(lambda found: tuple(sorted(set(found)))))
histories = st.lists(st.dictionaries(st.sampled_from([WEB, DNS, ServiceKey("198.51.100.11", 443, "tcp")]), prefix_lists,
                                     max_size=3), min_size=1, max_size=5)


@given(histories)
def test_any_history_of_lists_converges_in_one_plan_and_then_plans_nothing(history):
    kernel = ShadowKernel()
    for lists in history:
        desired = state(*(vs(key, allow) for key, allow in sorted(lists.items())))
        list(kernel.apply(plan(desired, kernel.read(), Memory(), 0.0, 0).ops))
        live = kernel.read()
        assert {e.key: e.prefixes for e in live.filter.allows} == {
            key: allow for key, allow in lists.items() if allow is not None}
        assert plan(desired, live, Memory(), 0.0, 0).ops == ()


def test_a_table_nftables_cannot_list_is_an_apply_error_naming_the_table():
    """So `status` and `apply` say it in one line, and the agent's pass logs it without a traceback."""
    from bridge.dataplane.errors import ApplyError
    from bridge.dataplane.kernel import Kernel
    from bridge.dataplane.nft import FilterError
    from tests.harness.web import CONFIG

    class Refusing:
        def read(self) -> LiveFilter:
            raise FilterError("Operation not permitted")

        def close(self) -> None:
            pass

    kernel = Kernel(replace(CONFIG, role="director"))
    try:
        kernel._nft = Refusing()  # type: ignore[assignment]
        with pytest.raises(ApplyError, match="inet maglev_bridge: Operation not permitted"):
            kernel.read_filter()
    finally:
        kernel.close()


def test_closing_the_kernel_closes_every_socket_it_opened_nftables_included():
    import os

    from bridge.dataplane.kernel import Kernel
    from tests.harness.web import CONFIG

    before = len(os.listdir("/proc/self/fd"))
    kernel = Kernel(replace(CONFIG, role="director"))
    assert kernel.nft is not None
    kernel.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_new_service_whose_allow_list_could_not_be_put_in_place_is_not_added():
    """Added anyway it would serve every source on a VIP already announced (its other port is served)."""
    from collections.abc import Iterable, Iterator

    from bridge.agent.reconcile import UNFILTERED, director_pass
    from bridge.core.model import RealServer
    from bridge.core.ops import AddDest, FilterOp, Op, OpResult
    from tests.harness.web import CONFIG

    class NoFilter(ShadowKernel):
        def apply(self, ops: Iterable[Op]) -> Iterator[OpResult]:
            for op in ops:
                if isinstance(op, FilterOp):
                    yield OpResult(op, "Operation not supported")
                else:
                    yield from super().apply([op])

    server = RealServer("10.1.0.5", 8080, 1, 1, "10.1.0.5", "app1", 0)
    other = replace(vs(ServiceKey("198.51.100.10", 443, "tcp"), None), real_servers=(server,))
    desired = state(other, replace(vs(WEB, ("192.0.2.0/24",)), real_servers=(server,)))
    kernel = NoFilter()
    outcome, _ = director_pass(desired, CONFIG, kernel, Memory(), apply=True, now=0.0)
    assert set(kernel.services) == {other.key}, "the service without a list is served; the one with a list waits"
    assert (AddService(WEB, "mh", ()).describe(), UNFILTERED) in [(s.description, s.error) for s in outcome.steps]
    assert (AddDest(WEB, "10.1.0.5", 8080, 1).describe(), UNFILTERED) in [
        (s.description, s.error) for s in outcome.steps]
    working = ShadowKernel(kernel.read())
    director_pass(desired, CONFIG, working, Memory(), apply=True, now=1.0)
    assert WEB in working.services and working.filter.allows[0].key == WEB, "the next pass adds both"


def test_the_kernel_view_moves_its_table_by_each_transaction_and_lists_it_again_only_after_a_failed_one():
    """Listing 2,000 sets costs 0.5-1.5 s: a pass that changed one list must not pay it. A transaction that
    took effect moves the cached table by its operations (a new rule with the handle the kernel echoed); a
    new VIP's route and announcement cannot change it."""
    from collections.abc import Iterable, Iterator

    from bridge.core.ops import Announce, Op, OpResult
    from bridge.dataplane.view import KernelView
    from tests.harness.web import CONFIG

    table = LiveFilter(True, (LiveAllow(WEB, ("192.0.2.0/24",), 7, True, 3),))

    class Counting:
        config = CONFIG

        def __init__(self) -> None:
            self.filter_reads = 0
            self.rule_handles: dict[tuple[str, int, str], int] = {}
            self.refusing = False

        def read(self, services: bool = True, filter_table: bool = True) -> LiveState:
            return LiveState(filter=self.read_filter() if filter_table else LiveFilter())

        def read_filter(self) -> LiveFilter:
            self.filter_reads += 1
            return table

        def read_services(self, scope: object = None) -> tuple[()]:
            return ()

        def apply(self, ops: Iterable[Op]) -> Iterator[OpResult]:
            return (OpResult(op, "EBUSY" if self.refusing and isinstance(op, FilterOp) else None) for op in ops)

    kernel = Counting()
    view = KernelView(kernel)  # type: ignore[arg-type]
    view.read(None)
    list(view.apply([AddRoute("198.51.100.20", "local", "lo"), Announce("198.51.100.20", 245)]))
    assert kernel.filter_reads == 1 and view.read(frozenset()).filter == table, "kept, not read again"
    kernel.rule_handles = {DNS: 9}
    list(view.apply([ChangeAllow(WEB, ("10.0.0.0/8",), ("192.0.2.0/24",)), AddAllow(DNS, ("192.0.2.0/24",))]))
    assert kernel.filter_reads == 1
    assert view.read(frozenset()).filter == LiveFilter(True, (
        LiveAllow(DNS, ("192.0.2.0/24",), 9, True), LiveAllow(WEB, ("10.0.0.0/8",), 7, True, 3)))
    kernel.refusing = True
    list(view.apply([DelAllow(WEB, 7, True, True)]))
    assert kernel.filter_reads == 2 and view.read(frozenset()).filter == table


def test_a_dry_run_shows_the_filter_changes_it_would_make_and_makes_none():
    """`apply --dry-run` is a pass that does not apply: its steps name the table and each list."""
    from bridge.agent.reconcile import director_pass
    from bridge.inspect.text import outcome_text
    from tests.harness.web import CONFIG

    kernel = ShadowKernel()
    outcome, _ = director_pass(state(vs(WEB, ("192.0.2.0/24",))), CONFIG, kernel, Memory(), apply=False, now=0.0)
    text = outcome_text(outcome)
    assert "create nftables table inet maglev_bridge, chain input (hook input priority filter)" in text
    assert "filter 198.51.100.10:80/tcp: allow only 192.0.2.0/24" in text
    assert kernel.read(None).filter == LiveFilter()
