"""bridge.core.maglev is bit-exact against the kernel's ip_vs_mh: for every flow sent, the real server the kernel
picks (or its drop) is the one the model predicts from the same real-server history.

`explain`, the directors' fingerprints and the agreement benchmark all trust the model; the unit tests only
hold it against a port of ip_vs_mh.c, which shares our reading of the C.  Here the kernel itself is the
oracle.  One director namespace holds IPVS services built by `ipvsadm -R` from scripted histories of adds,
edits and deletions (so list order and remembered weights are the kernel's own), with real servers routed
to a dummy device; a client namespace sends one datagram or one SYN per flow from chosen source addresses
and ports (transparent sockets, so any documentation-range address can be a client); the kernel's choice
is read back from `/proc/net/ip_vs_conn` of the director, where a flow without a connection was dropped.
An nftables counter in front of IPVS proves every flow reached it, so a lost packet never passes as a drop.
"""

from __future__ import annotations

import ipaddress
import random
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bridge.core.maglev import (
    DEFAULT_TABLE_SIZE,
    Dest,
    IntArray,
    MaglevTable,
    address_key,
    build_table,
    fingerprint,
    lookup_many,
)
from tests.harness.netns import Netns

pytestmark = pytest.mark.kernel

IP_TRANSPARENT = 19
"""linux/in.h: bind to and send from an address this host does not own."""
IPV6_TRANSPARENT = 75
"""linux/in6.h: the same for IPv6."""

DIRECTOR_MAC, CLIENT_MAC = "02:00:00:00:01:01", "02:00:00:00:01:02"
# Services listen on 198.51.100.128/25 and 2001:db8:2::/64 (local routes in the director); real servers
# live on 192.0.2.128/25 and 2001:db8:3::/64 (routed into a dummy device); clients send from the rest.
REAL_SERVERS = [f"192.0.2.{129 + i}" for i in range(100)]
REAL_SERVERS6 = [f"2001:db8:3::{i + 1:x}" for i in range(40)]
SOURCES = [f"203.0.113.{i}" for i in range(1, 255)] + [f"198.51.100.{i}" for i in range(1, 127)]
COUNTER = """
table inet maglev_exact {
    chain flows {
        type filter hook prerouting priority -300; policy accept;
        meta l4proto { tcp, udp } th dport 8000-8999 counter
    }
}
"""

Flow = tuple[str, int]


@dataclass(frozen=True)
class Step:
    """One ipvsadm command on a real server: add, edit or delete."""

    verb: str
    address: str
    port: int
    weight: int = 0


def adds(addresses: Iterable[str], port: int, weights: Iterable[int]) -> list[Step]:
    return [Step("add", a, port, w) for a, w in zip(addresses, weights, strict=True)]


def endpoint(address: str, port: int) -> str:
    """How ipvsadm -n writes an address and port (IPv6 in brackets, compressed)."""
    ip = ipaddress.ip_address(address)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True)
class Service:
    """One virtual service: the history that builds it and the flows sent to it."""

    name: str
    proto: str
    vip: str
    port: int
    flags: tuple[str, ...]
    steps: tuple[Step, ...]
    flows: tuple[Flow, ...]
    forward: str = "-g"

    @property
    def key(self) -> str:
        return f"{self.proto} {endpoint(self.vip, self.port)}"

    @property
    def v6(self) -> bool:
        return ":" in self.vip

    def dests(self) -> list[Dest]:
        """The kernel's list after the steps, head first: adds go to the head, edits keep the place."""
        dests: list[Dest] = []
        for s in self.steps:
            if s.verb == "add":
                dests.insert(0, Dest.added(s.address, s.port, s.weight))
            elif s.verb == "edit":
                dests = [d.with_weight(s.weight) if (d.address, d.port) == (s.address, s.port) else d for d in dests]
            else:
                dests = [d for d in dests if (d.address, d.port) != (s.address, s.port)]
        return dests

    def ipvsadm_lines(self) -> list[str]:
        """The history for `ipvsadm -R`; edits repeat the forwarding method, which ipvsadm would reset to -g."""
        svc = f"{'-t' if self.proto == 'tcp' else '-u'} {endpoint(self.vip, self.port)}"
        lines = [f"-A {svc} -s mh" + (f" -b {','.join(self.flags)}" if self.flags else "")]
        for s in self.steps:
            rs = f"-r {endpoint(s.address, s.port)}"
            if s.verb == "del":
                lines.append(f"-d {svc} {rs}")
            else:
                lines.append(f"-{s.verb[0]} {svc} {rs} {self.forward} -w {s.weight}")
        return lines

    def predict(self, table: MaglevTable | None = None, *, fallback: bool | None = None) -> IntArray:
        """The model's real-server index per flow (-1: dropped); `fallback` overrides the service's flag."""
        table = table or build_table(self.dests(), DEFAULT_TABLE_SIZE)
        keys = np.array([address_key(a) for a, _ in self.flows], dtype=np.uint64)
        ports = np.array([p for _, p in self.flows], dtype=np.uint64)
        return lookup_many(table, keys, ports, mh_port="mh-port" in self.flags,
                           mh_fallback="mh-fallback" in self.flags if fallback is None else fallback)

    def expected(self) -> dict[Flow, str | None]:
        """The model's answer per flow: the real server as `address:port`, None where the kernel drops it."""
        table = build_table(self.dests(), DEFAULT_TABLE_SIZE)
        names = [endpoint(d.address, d.port) for d in table.dests]
        return {flow: names[i] if i >= 0 else None for flow, i in zip(self.flows, self.predict(table).tolist(),
                                                                      strict=True)}



class Lab:
    """A director with IPVS and a client wired by one veth pair; the client sends from any address."""

    def __init__(self, netns: Callable[[str], Netns]) -> None:
        self.director = netns("mhd")
        self.client = netns("mhc")
        self.sent = 0
        self.director.ip_batch([
            "link set lo up",
            f"link add eth0 address {DIRECTOR_MAC} type veth peer name eth0 address {CLIENT_MAC} "
            f"netns {self.client.name}",
            "link set eth0 up",
            "addr add 192.0.2.1/24 dev eth0",
            "addr add 2001:db8:1::1/64 dev eth0 nodad",
            "link add dummy0 type dummy",
            "link set dummy0 up",
            "route add local 198.51.100.128/25 dev lo",
            "route add local 2001:db8:2::/64 dev lo",
            "route add 192.0.2.128/25 dev dummy0",
            "route add 2001:db8:3::/64 dev dummy0",
            # where the kernel's "port unreachable" for a dropped flow goes (IPv4 clients only)
            "route add 203.0.113.0/24 via 192.0.2.2",
            "route add 198.51.100.0/25 via 192.0.2.2",
        ])
        self.client.ip_batch([
            "link set lo up",
            "link set eth0 up",
            "addr add 192.0.2.2/24 dev eth0",
            "addr add 2001:db8:1::2/64 dev eth0 nodad",
            f"neigh replace 192.0.2.1 lladdr {DIRECTOR_MAC} dev eth0 nud permanent",
            f"neigh replace 2001:db8:1::1 lladdr {DIRECTOR_MAC} dev eth0 nud permanent",
            "route add 198.51.100.128/25 via 192.0.2.1",
            "route add 2001:db8:2::/64 via 2001:db8:1::1",
        ])
        self.director.run("nft", "-f", "-", input=COUNTER)

    def build(self, services: Sequence[Service]) -> None:
        """Every service's history through one `ipvsadm -R`; then the kernel's lists must be the model's."""
        script = "\n".join(line for s in services for line in s.ipvsadm_lines()) + "\n"
        self.director.run("ipvsadm", "-R", input=script)
        listed = self.lists()
        for s in services:
            assert listed[s.key] == [(endpoint(d.address, d.port), d.weight) for d in s.dests()], s.name

    def lists(self) -> dict[str, list[tuple[str, int]]]:
        """Each service's real servers in kernel list order (`--nosort`: the netlink dump, head first)."""
        lists: dict[str, list[tuple[str, int]]] = {}
        current: list[tuple[str, int]] = []
        for line in self.director.ipvsadm("-Ln", "--nosort").splitlines():
            if head := re.match(r"(TCP|UDP)\s+(\S+)\s+mh\b", line):
                current = lists.setdefault(f"{head[1].lower()} {head[2]}", [])
            elif dest := re.match(r"\s+->\s+(\S+)\s+\w+\s+(\d+)", line):
                current.append((dest[1], int(dest[2])))
        return lists

    def send(self, service: Service) -> None:
        """One datagram, or one SYN (non-blocking connect, closed at once), per flow."""
        family = socket.AF_INET6 if service.v6 else socket.AF_INET
        level, option = (socket.IPPROTO_IPV6, IPV6_TRANSPARENT) if service.v6 else (socket.IPPROTO_IP, IP_TRANSPARENT)
        kind = socket.SOCK_STREAM if service.proto == "tcp" else socket.SOCK_DGRAM
        target = (service.vip, service.port)
        with self.client.entered():
            for flow in service.flows:
                with socket.socket(family, kind) as s:
                    s.setsockopt(level, option, 1)
                    s.bind(flow)
                    if kind == socket.SOCK_STREAM:
                        s.setblocking(False)
                        s.connect_ex(target)
                    else:
                        s.sendto(b"?", target)
        self.sent += len(service.flows)

    def picked(self, service: Service) -> dict[Flow, str | None]:
        """The kernel's choice per flow, from its connection table; None where it made no connection.

        Read right after sending: a SYN-only TCP connection expires after 60 s.
        """
        with self.director.entered():
            text = Path("/proc/thread-self/net/ip_vs_conn").read_text()
        proto, vip, port = service.proto.upper(), ipaddress.ip_address(service.vip), f"{service.port:04X}"
        found: dict[Flow, str] = {}
        for line in text.splitlines()[1:]:
            f = line.split()
            if f[0] != proto or f[4] != port or _address(f[3]) != vip:
                continue
            found[(str(_address(f[1])), int(f[2], 16))] = endpoint(str(_address(f[5])), int(f[6], 16))
        return {flow: found.get(flow) for flow in service.flows}

    def received(self) -> int:
        """Flows that reached the director's prerouting hook, in front of IPVS."""
        out = self.director.run("nft", "list", "table", "inet", "maglev_exact").stdout
        return int(re.search(r"counter packets (\d+)", out)[1])

    def compare(self, services: Sequence[Service]) -> dict[str, dict[Flow, str | None]]:
        """Build, send and read back every service; return the kernel's picks per service name."""
        self.build(services)
        seen = {}
        for s in services:
            self.send(s)
            seen[s.name] = self.picked(s)
        assert self.received() == self.sent, "flows were lost before IPVS: a missing connection would not be a drop"
        return seen


def _address(field: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """ip_vs_conn writes IPv4 as 8 hex digits of the host-order value and IPv6 in full colon form."""
    return ipaddress.ip_address(field if ":" in field else int(field, 16))


def random_flows(rng: random.Random, count: int, sources: Sequence[str] = SOURCES) -> tuple[Flow, ...]:
    flows: dict[Flow, None] = {}
    while len(flows) < count:
        flows[(rng.choice(sources), rng.randrange(1024, 65536))] = None
    return tuple(flows)


def one_per_address(rng: random.Random) -> tuple[Flow, ...]:
    """Without mh-port only the address is hashed: every source address once."""
    return tuple((a, rng.randrange(1024, 65536)) for a in SOURCES)


def random_v6_sources(rng: random.Random, count: int) -> list[str]:
    return [str(ipaddress.IPv6Address((0x20010DB8_0004 << 80) | rng.getrandbits(64))) for _ in range(count)]


def vip(i: int) -> str:
    return f"198.51.100.{128 + i}"


def matrix(rng: random.Random) -> list[Service]:
    """Histories covering what the table depends on: 1 to 50 servers, weights up to 65535 (shifted to fit),
    weight 0 at add (no slots) and edited to 0 (slots kept: re-hashed with mh-fallback, dropped without),
    deletions, re-adds from the kernel's trash, IPv6, TCP and UDP, address-only and address+port hashing,
    (NAT) several real servers on one address with their own ports, real servers forwarding by GUE tunnel
    (`encapsulation: gue`: the backends' own addresses; the forwarding method must not move a flow), and an IPv6
    service whose real servers are IPv4 (mixed address families, which IPVS allows only with tunnel forwarding:
    what an IPv6 VIP over an IPv4 underlay is). The kernel hashes a real server with the service's family
    (`ip_vs_mh_permutate` passes `svc->af`), so an IPv4 real server of an IPv6 service is folded as a 16-byte
    address whose last 12 bytes are zero: the same number as the IPv4 address, which is what the model hashes; and
    an IPv6 service whose real servers are IPv6 by GUE tunnel (`gue` mode's IPv6 backends). An IPv4 service with
    IPv6 real servers is not here: the agent refuses that pair (the kernel hashes only their first 32 bits)."""
    rs = REAL_SERVERS
    weights = [0 if i % 9 == 0 else rng.randint(1, 20) for i in range(50)]  # every ninth added at 0
    drained, flapped = rng.sample(rs[1:50:2], 6), rng.sample(rs[2:50:2], 2)
    churn = [*adds(rs[:50], 8004, weights),
             *(Step("edit", a, 8004, 0) for a in drained + flapped),
             *(Step("edit", a, 8004, rng.randint(21, 40)) for a in [*flapped, rs[9], rs[10]])]
    churn_flows = random_flows(rng, 2500)
    heavy = [65535, 1, 300, 4096, 7, 65535, 12, 1000, 2, 40000, 3, 50]
    twenty = adds(rs[:20], 8006, [rng.randint(1, 4) for _ in range(20)])
    twenty += [Step("edit", rs[i], 8006, 0) for i in (0, 7, 13, 19)]
    trash = adds(rs[:6], 8009, [3, 1, 4, 1, 5, 9])
    trash += [Step("del", rs[2], 8009), Step("add", rs[2], 8009, 0),
              Step("del", rs[4], 8009), Step("add", rs[4], 8009, 2), Step("edit", rs[0], 8009, 0)]
    v6 = adds(REAL_SERVERS6[:30], 8010, [rng.randint(1, 10) for _ in range(30)])
    v6 += [Step("edit", a, 8010, 0) for a in REAL_SERVERS6[3:30:9]]
    nat = [Step("add", rs[i // 2], 9001 + i % 2, rng.randint(1, 5)) for i in range(10)]
    gue = adds(rs[50:70], 8013, [rng.randint(1, 6) for _ in range(20)])
    gue += [Step("edit", a, 8013, 0) for a in rs[52:70:6]] + [Step("del", rs[55], 8013), Step("add", rs[55], 8013, 3)]
    mixed = adds(rs[60:85], 8012, [rng.randint(1, 10) for _ in range(25)])
    mixed += [Step("edit", a, 8012, 0) for a in rs[62:85:8]]
    under6 = adds(REAL_SERVERS6[12:40], 8015, [rng.randint(1, 6) for _ in range(28)])
    under6 += [Step("edit", a, 8015, 0) for a in REAL_SERVERS6[14:40:7]]
    by_gue = "-i --tun-type gue --tun-port 6080"
    return [
        Service("one server", "udp", vip(1), 8001, ("mh-port",), tuple(adds(rs[:1], 8001, [1])),
                random_flows(rng, 300)),
        Service("five mixed weights, address only", "udp", vip(2), 8002, (),
                tuple(adds(rs[:5], 8002, [1, 2, 3, 5, 1])), one_per_address(rng)),
        Service("twelve heavy weights shifted to fit", "tcp", vip(3), 8003, ("mh-port",),
                tuple(adds(rs[:12], 8003, heavy)), random_flows(rng, 1500)),
        Service("fifty, zero at add, drained, re-weighted, fallback", "udp", vip(4), 8004,
                ("mh-port", "mh-fallback"), tuple(churn), churn_flows),
        Service("the same fifty without fallback", "udp", vip(5), 8004, ("mh-port",), tuple(churn), churn_flows),
        Service("twenty drained, address only, fallback", "tcp", vip(6), 8006, ("mh-fallback",), tuple(twenty),
                one_per_address(rng)),
        Service("every server drained", "udp", vip(7), 8007, ("mh-port", "mh-fallback"),
                (*adds(rs[:4], 8007, [2, 1, 1, 3]), *(Step("edit", a, 8007, 0) for a in rs[:4])),
                random_flows(rng, 200)),
        Service("only a server added at zero is left", "udp", vip(8), 8008, ("mh-port", "mh-fallback"),
                (Step("add", rs[0], 8008, 5), Step("add", rs[1], 8008, 0), Step("del", rs[0], 8008)),
                random_flows(rng, 200)),
        Service("deleted and re-added from the trash", "udp", vip(9), 8009, ("mh-port", "mh-fallback"),
                tuple(trash), random_flows(rng, 800)),
        Service("IPv6, thirty, three drained", "udp", "2001:db8:2::10", 8010, ("mh-port", "mh-fallback"),
                tuple(v6), random_flows(rng, 1500, random_v6_sources(rng, 1000))),
        Service("NAT, two real servers per address on their own ports", "udp", vip(11), 8011, ("mh-port",),
                tuple(nat), random_flows(rng, 800), forward="-m"),
        Service("IPv6 VIP, IPv4 real servers by tunnel forwarding, three drained", "tcp", "2001:db8:2::12", 8012,
                ("mh-port", "mh-fallback"), tuple(mixed), random_flows(rng, 1500, random_v6_sources(rng, 1000)),
                forward="-i"),
        Service("GUE tunnel real servers (encapsulation: gue), drained, re-added, fallback", "tcp", vip(13), 8013,
                ("mh-port", "mh-fallback"), tuple(gue), random_flows(rng, 800),
                forward=by_gue),
        Service("IPv6 VIP, IPv6 real servers by GUE over IPv6, four drained", "tcp", "2001:db8:2::15", 8015,
                ("mh-port", "mh-fallback"), tuple(under6), random_flows(rng, 1000, random_v6_sources(rng, 800)),
                forward=by_gue),
    ]


def mismatches(seen: dict[Flow, str | None], expected: dict[Flow, str | None]) -> str:
    wrong = [(f, seen[f], expected[f]) for f in expected if seen[f] != expected[f]]
    shown = "\n".join(f"  {a}:{p}  kernel {k}  model {m}" for (a, p), k, m in wrong[:10])
    return f"{len(wrong)} of {len(expected)} flows differ:\n{shown}"


def test_kernel_picks_the_real_server_the_model_predicts_for_every_flow(netns):
    lab = Lab(netns)
    services = matrix(random.Random(61))
    seen = lab.compare(services)
    compared = dropped = rehashed = 0
    for s in services:
        expected = s.expected()
        assert seen[s.name] == expected, f"{s.name}: {mismatches(seen[s.name], expected)}"
        compared += len(expected)
        dropped += sum(v is None for v in expected.values())
        if "mh-fallback" in s.flags:
            rehashed += int(np.count_nonzero((s.predict(fallback=False) < 0) & (s.predict() >= 0)))
    by_name = {s.name: seen[s.name] for s in services}
    assert all(v is None for v in by_name["every server drained"].values())
    assert all(v is None for v in by_name["only a server added at zero is left"].values())
    assert dropped > 400 and rehashed > 100, "the matrix must exercise drops and mh-fallback re-hashes"
    print(f"\nmaglev exact: {compared} flows over {len(services)} services, kernel == model for every one "
          f"({dropped} dropped, {rehashed} re-hashed by mh-fallback)")


def test_tables_follow_list_order_and_remembered_weights_not_the_rest_of_the_history(netns):
    lab = Lab(netns)
    rng = random.Random(62)
    a, b, c, d, e = REAL_SERVERS[:5]
    flows = one_per_address(rng)
    direct = adds([a, b, c, d, e], 8020, [1, 2, 3, 1, 4])
    detour = [Step("add", a, 8020, 7), Step("add", b, 8020, 2), Step("add", REAL_SERVERS[9], 8020, 5),
              Step("add", c, 8020, 3), Step("add", d, 8020, 0), Step("add", e, 8020, 4),
              Step("edit", a, 8020, 1), Step("edit", d, 8020, 1), Step("del", REAL_SERVERS[9], 8020)]
    reordered = adds([e, d, c, b, a], 8020, [4, 1, 3, 2, 1])
    # the same listing in ipvsadm (d at weight 0), but d remembers 0 in one and 5 in the other
    forgot = adds([a, b, c, d, e], 8020, [1, 2, 3, 0, 4])
    remembers = [*adds([a, b, c, d, e], 8020, [1, 2, 3, 5, 4]), Step("edit", d, 8020, 0)]
    services = [Service(name, "udp", vip(20 + i), 8020, flags, tuple(steps), flows) for i, (name, flags, steps) in
                enumerate([("direct", (), direct), ("detour", (), detour), ("reordered", (), reordered),
                           ("forgot", ("mh-fallback",), forgot), ("remembers", ("mh-fallback",), remembers)])]
    seen = lab.compare(services)
    for s in services:
        expected = s.expected()
        assert seen[s.name] == expected, f"{s.name}: {mismatches(seen[s.name], expected)}"
    prints = {s.name: fingerprint(build_table(s.dests(), DEFAULT_TABLE_SIZE)) for s in services}

    assert lab.lists()[services[0].key] == lab.lists()[services[1].key]
    assert prints["direct"] == prints["detour"]
    assert seen["direct"] == seen["detour"]

    assert prints["direct"] != prints["reordered"]
    assert seen["direct"] != seen["reordered"]

    assert lab.lists()[services[3].key] == lab.lists()[services[4].key]
    assert prints["forgot"] != prints["remembers"]
    assert seen["forgot"] != seen["remembers"]
    print(f"\nmaglev fingerprints: {len(services) * len(flows)} flows, kernel == model; equal lists and remembered "
          "weights route alike whatever the history, insertion order and remembered weights change the table")
