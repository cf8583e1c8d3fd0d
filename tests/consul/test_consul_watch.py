"""The Consul source watches within its connection budget and misses no kind of catalog change: every kind of
edit an operator or Nomad makes, applied to a real Consul in random order, reaches the source's snapshot.

`wait` is long (5m) on purpose: the periodic sweep after each re-arm of the service list would otherwise
hide a change that no feed reported."""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from bridge.catalog import consul as consul_watch
from bridge.catalog.consul import ConsulSource
from bridge.catalog.consul_format import parse_service
from bridge.core.config import Config, ConfigError, ConsulConfig, parse_config
from bridge.core.model import Snapshot
from tests.harness.consul_agent import ConsulAgent
from tests.harness.wait import wait_until

pytestmark = pytest.mark.consul
TAG = "maglev.vip"


def source_for(consul: ConsulAgent, **options: Any) -> ConsulSource:
    config = Config(vip_cidrs=(ipaddress.IPv4Network("198.51.100.0/24"),),
                    consul=ConsulConfig(address=f"http://{consul.http_addr}", **{"wait": "5m", **options}))
    return ConsulSource(config)


def direct_read(consul: ConsulAgent) -> Snapshot:
    """What the source should hold: every tagged service read afresh, through the same boundary."""
    services = consul.api("/v1/catalog/services")
    tagged = sorted(name for name, tags in services.items()
                    if any(t == TAG or t.startswith(TAG + "=") for t in tags or ()))
    parsed = {name: parse_service(name, json.dumps(consul.api(f"/v1/health/service/{name}"))) for name in tagged}
    return Snapshot.of_services({name: p.instances for name, p in parsed.items()},
                                tuple(r for p in parsed.values() for r in p.rejected))


def agrees(source: ConsulSource, consul: ConsulAgent) -> bool:
    mine, fresh = source.snapshot(), direct_read(consul)
    return mine.by_service() == fresh.by_service() and mine.rejected == fresh.rejected


@dataclass
class Member:
    """One service instance as the test registered it."""

    service: str
    node: str
    port: int
    tags: list[str]
    address: str | None
    """None: the instance has no address of its own and uses its node's."""
    checked: bool = True

    @property
    def sid(self) -> str:
        return f"{self.service}-{self.node}"


@dataclass
class Catalog:
    """The test's side of the catalog: registers through `/v1/catalog/register` as Nomad's Consul agent
    does (the service alone when only it changed, its check along when asked)."""

    consul: ConsulAgent
    rng: random.Random
    members: dict[str, Member] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)
    services: int = 0

    def put(self, member: Member, with_check: bool, status: str = "passing") -> None:
        service: dict[str, Any] = {"ID": member.sid, "Service": member.service, "Port": member.port,
                                   "Tags": member.tags, "Address": member.address or ""}
        body: dict[str, Any] = {"Node": member.node, "Address": self.nodes[member.node], "SkipNodeUpdate": True,
                                "Service": service}
        if with_check and member.checked:
            body["Check"] = {"CheckID": f"service:{member.sid}", "Name": "ttl", "Status": status,
                             "ServiceID": member.sid}
        self.consul.api("/v1/catalog/register", method="PUT", body=body)
        self.members[member.sid] = member

    def node(self) -> str:
        name = f"n{self.rng.randrange(6)}"
        if name not in self.nodes:
            self.nodes[name] = f"192.0.2.{len(self.nodes) + 10}"
            self.consul.api("/v1/catalog/register", method="PUT", body={"Node": name, "Address": self.nodes[name]})
        return name

    def pick(self) -> Member | None:
        return self.rng.choice(sorted(self.members.values(), key=lambda m: m.sid)) if self.members else None

    def vip(self, service: str) -> str:
        return f"{TAG}=198.51.100.{int(service.removeprefix('svc')) + 1}:80"

    # ---- the kinds of edit ----

    def add_service(self) -> str:
        name = f"svc{self.services}"
        self.services += 1
        self.put(Member(name, self.node(), 8000, [self.vip(name)], None), with_check=True)
        return f"service {name} added with the lb tag"

    def register(self) -> str:
        existing = self.pick()
        if existing is None:
            return self.add_service()
        node = self.node()
        member = Member(existing.service, node, 8000 + self.rng.randrange(100), [self.vip(existing.service)],
                        self.rng.choice([None, f"203.0.113.{self.rng.randrange(1, 250)}"]),
                        checked=self.rng.random() < 0.7)
        self.put(member, with_check=True)
        return f"{member.sid} registered ({'with' if member.checked else 'without'} a check)"

    def deregister(self) -> str:
        member = self.pick()
        if member is None:
            return self.add_service()
        self.consul.api("/v1/catalog/deregister", method="PUT", body={"Node": member.node, "ServiceID": member.sid})
        del self.members[member.sid]
        return f"{member.sid} deregistered"

    def check(self) -> str:
        member = self.pick()
        if member is None or not member.checked:
            return self.register()
        status = self.rng.choice(["passing", "warning", "critical"])
        self.consul.api("/v1/catalog/register", method="PUT", body={
            "Node": member.node, "Address": self.nodes[member.node], "SkipNodeUpdate": True,
            "Check": {"CheckID": f"service:{member.sid}", "Name": "ttl", "Status": status, "ServiceID": member.sid}})
        return f"{member.sid} check {status}"

    def node_check(self) -> str:
        node = self.node()
        status = self.rng.choice(["passing", "critical", "warning"])
        self.consul.api("/v1/catalog/register", method="PUT", body={
            "Node": node, "Address": self.nodes[node], "SkipNodeUpdate": True,
            "Check": {"CheckID": "node-health", "Name": "node", "Status": status}})
        return f"node {node} check {status}"

    def edit(self, change: Callable[[Member], Member], what: str) -> str:
        member = self.pick()
        if member is None:
            return self.add_service()
        with_check = self.rng.random() < 0.5
        self.put(change(member), with_check=with_check)
        return f"{member.sid} {what} ({'check sent along' if with_check else 'service alone'})"

    def tag_edit(self) -> str:
        extra = f"team-{self.rng.randrange(3)}"
        return self.edit(lambda m: replace(m, tags=[t for t in m.tags if not t.startswith("team-")] + [extra]),
                         f"tag {extra}")

    def weight_edit(self) -> str:
        weight = f"maglev.weight={self.rng.randrange(0, 5)}"
        return self.edit(lambda m: replace(m, tags=[t for t in m.tags if not t.startswith("maglev.weight")]
                                           + [weight]), weight)

    def address_edit(self) -> str:
        address = f"203.0.113.{self.rng.randrange(1, 250)}"
        return self.edit(lambda m: replace(m, address=address), f"address {address}")

    def port_edit(self) -> str:
        port = 9000 + self.rng.randrange(1000)
        return self.edit(lambda m: replace(m, port=port), f"port {port}")

    def node_address_edit(self) -> str:
        node = self.node()
        self.nodes[node] = f"198.51.100.{self.rng.randrange(100, 250)}"
        self.consul.api("/v1/catalog/register", method="PUT", body={"Node": node, "Address": self.nodes[node]})
        return f"node {node} address {self.nodes[node]}"

    def tag_removed(self) -> str:
        member = self.pick()
        if member is None:
            return self.add_service()
        if self.rng.random() < 0.5:  # from one instance, or from the whole service
            chosen = [member]
        else:
            chosen = [m for m in self.members.values() if m.service == member.service]
        for one in chosen:
            self.put(replace(one, tags=[t for t in one.tags if not t.startswith(TAG)]), with_check=False)
        return f"lb tag removed from {len(chosen)} instance(s) of {member.service}"


EDITS = ("add_service", "register", "deregister", "check", "node_check", "tag_edit", "weight_edit", "address_edit",
         "port_edit", "node_address_edit", "tag_removed")


@contextlib.contextmanager
def watching(consul: ConsulAgent, seed: int) -> Iterator[tuple[Catalog, ConsulSource]]:
    """Three tagged services, and a source with the least budget (6) that has taken them in."""
    catalog = Catalog(consul, random.Random(seed))
    for _ in range(3):
        catalog.add_service()
    source = source_for(consul, max_connections=6)
    source.start(lambda reason: None)
    try:
        wait_until(lambda: agrees(source, consul))
        yield catalog, source
    finally:
        source.stop()


@pytest.mark.parametrize("seed", [1, 2])
def test_every_kind_of_catalog_edit_in_random_order_reaches_the_snapshot(consul_agent, seed):
    with watching(consul_agent, seed) as (catalog, source):
        done: list[str] = []
        kinds = [*EDITS, *(catalog.rng.choice(EDITS) for _ in range(40))]
        catalog.rng.shuffle(kinds)
        for kind in kinds:
            done.append(getattr(catalog, kind)())
            try:
                wait_until(lambda: agrees(source, consul_agent), timeout=60, interval=0.05)
            except AssertionError as exc:
                raise AssertionError(f"missed after: {done[-3:]}") from exc
        assert source.health()["connections"]["most"] <= 6
        assert source.health()["watches"] == 4


def test_a_registration_no_feed_names_is_found_in_the_agents_cache_while_the_sweep_waits_for_its_budget(
        consul_agent, monkeypatch):
    """An instance registered with its check already passing moves only the service list's index: only a sweep
    finds it. With a budget so small that, once every service has an index, at most one more budgeted sweep
    can run in the next five minutes, three such registrations are each found: at least two by the sweeps of
    the local agent's cache (`?cached`, no read on the servers) that run while the budgeted one waits."""
    monkeypatch.setattr(consul_watch, "SWEEP_RATE", 0.01)
    with watching(consul_agent, 3) as (catalog, source):
        before = source.health()
        for n in range(3):
            existing = catalog.pick()
            assert existing is not None
            catalog.nodes[f"new{n}"] = f"192.0.2.{200 + n}"
            catalog.put(Member(existing.service, f"new{n}", 8100 + n, [catalog.vip(existing.service)], None),
                        with_check=True, status="passing")
            wait_until(lambda: agrees(source, consul_agent), timeout=60, interval=0.05)
        after = source.health()
        assert after["sweeps"] <= before["sweeps"] + 1, after
        assert after["cached_sweeps"] >= before["cached_sweeps"] + 2, after


@pytest.mark.parametrize(("budget", "advice"), [(5, "set 6 or more"), (0, "set 6 or more"), (65, "set at most 64")])
def test_a_connection_budget_that_cannot_work_is_refused_with_what_to_set(budget, advice):
    with pytest.raises(ConfigError, match=f"consul.max_connections: {budget} .*{advice}"):
        parse_config({"consul": {"max_connections": budget}})


class Neighbour:
    """Another client on 127.0.0.1 doing its own blocking queries, as Nomad's client does against its local
    Consul agent: `count` queries at once, each re-armed as soon as it returns, every status recorded."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.statuses: list[int] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        index = 1
        while not self.stop.is_set():
            try:
                conn.request("GET", f"/v1/catalog/nodes?index={index}&wait=2s")
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                continue
            self.statuses.append(resp.status)
            index = int(resp.getheader("X-Consul-Index") or 1)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(40)


def test_a_large_catalog_fits_the_budget_and_the_neighbours_are_never_refused(consul_agent):
    """Consul's default limits (200 connections per client address): the old watch, one connection per
    tagged service, was refused past ~190 services and took the neighbours' share."""
    from bench.consul_latency import Client, build_instances

    instances = build_instances(services=400, instances=5)
    client = Client(consul_agent.http_port)
    for inst in instances:
        client.register(inst, "passing")
    neighbour = Neighbour(consul_agent.http_port, count=150)
    source = source_for(consul_agent, wait="30s")
    source.start(lambda reason: None)
    try:
        wait_until(lambda: len(source.snapshot().instances) == len(instances), timeout=300)
        changed = instances[len(instances) // 2]
        client.register(changed, "critical")
        wait_until(lambda: any(i.instance_id == changed.sid and i.health == "critical"
                               for i in source.snapshot().instances), timeout=60)
        state = source.health()
        assert state["ok"], state["errors"]
        assert "429" not in state["error_counts"]
        assert state["connections"]["most"] <= 8
    finally:
        source.stop()
        neighbour.close()
    assert neighbour.statuses and set(neighbour.statuses) == {200}
