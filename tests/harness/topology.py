"""The kernel test bed's nodes on one L2 segment: directors, backends and clients in network namespaces on a
bridge (or the clients behind a router), with the seed post's hand configuration for comparison.  How to use
it: tests/harness/README.md."""

from __future__ import annotations

import secrets
import socket
import subprocess
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tests.harness.addresses import (
    CLIENT6_NET,
    CLIENT_NET,
    FOU_PORT,
    ROUTER_ADDRESS,
    ROUTER_ADDRESS6,
    ROUTER_CLIENT_ADDRESS,
    ROUTER_CLIENT_ADDRESS6,
    UNDERLAY_NET,
    VIP_NET,
    backend_address,
    backend_address6,
    client_address,
    client_address6,
    director_address,
    director_address6,
    tunnel_address,
)
from tests.harness.echo import SERVER_CODE, Conn, Server
from tests.harness.netns import VENV_PYTHON, Bed, Netns

MAX_DIRECTORS, MAX_BACKENDS, MAX_CLIENTS = 3, 6, 4
# The router forwards, hashes ECMP flows on the 5-tuple (L4), and must not drop the backends' DSR replies,
# which arrive on another interface than the clients' packets left by.
# IPv6 has its own hash policy: its default (0) hashes the flow label, which a client's kernel changes
# (net.ipv6.auto_flowlabels) when it picks a new socket hash after a retransmission timeout, so one TCP
# connection could move to another director in the middle; policy 1 hashes the 5-tuple only.
ROUTER_SYSCTLS = {"net.ipv4.ip_forward": 1, "net.ipv4.fib_multipath_hash_policy": 1,
                  "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
                  "net.ipv6.conf.all.forwarding": 1, "net.ipv6.fib_multipath_hash_policy": 1}
# A client's TCP picks a new random socket hash on every retransmission timeout (net.core.txrehash, default
# 1), and a veth keeps the sender's skb hash into the router's namespace, where the L4 ECMP policy uses a
# hash already present instead of the 5-tuple (fib_multipath_hash, rt6_multipath_hash: "short-circuit if
# we already have L4 hash present"). So in this bed, and not behind a real NIC, every client RTO (an
# emulated stall is enough) re-rolled its flow's director: measured with two IPv6 next hops on the host,
# 17-21 of 40 connections changed next hop after one loss episode with policy 0 or 1, none with
# txrehash=0. Clients keep one hash per connection, as a flow's 5-tuple hash is on a real router.
CLIENT_SYSCTLS = {"net.core.txrehash": 0}


class Node(Netns):
    role = "node"

    def __init__(self, name: str, bed: Bed, label: str, index: int, address: str, bridge: Netns):
        super().__init__(name, bed)
        self.label = label
        self.index = index
        self.address = address
        self.address6: str | None = None
        """Its IPv6 address, in the routed topology only."""
        self._bridge = bridge

    def unplug(self) -> None:
        """Take this node's bridge port down: it neither sends nor receives on the segment."""
        self._bridge.ip("link", "set", self.label, "down")

    def plug(self) -> None:
        self._bridge.ip("link", "set", self.label, "up")


class Director(Node):
    role = "director"


class Backend(Node):
    role = "backend"

    def __init__(self, name: str, bed: Bed, label: str, index: int, address: str, bridge: Netns):
        super().__init__(name, bed, label, index, address, bridge)
        self.tunnel_address = tunnel_address(index)

    def start_server(self, port: int = 80, proto: str = "tcp", name: str | None = None,
                     ipv6: bool = False) -> Server:
        """Start the echo server without waiting for it (see Server.wait_ready, Topology.serve); `ipv6`: on
        IPv6 (an IPv6 VIP's backends)."""
        assert proto in ("tcp", "udp"), proto
        name = name or self.label
        log = self._bed.tmpdir / f"{self.name}-server-{proto}-{port}{'-6' if ipv6 else ''}.log"
        proc = self.popen(VENV_PYTHON, "-c", SERVER_CODE, name, str(port), proto, *(["6"] if ipv6 else []),
                          stdout=subprocess.PIPE, stderr=log.open("ab"))
        return Server(self, name, port, proto, proc, log)

    def serve(self, port: int = 80, proto: str = "tcp", name: str | None = None) -> Server:
        server = self.start_server(port, proto, name)
        server.wait_ready()
        return server


class Client(Node):
    role = "client"

    def via(self, director: Director) -> None:
        """Route the VIP range to this director (what an ECMP router would do for one flow)."""
        self.ip("route", "replace", VIP_NET, "via", director.address, "dev", "eth0")

    def connect(self, vip: str, port: int = 80, sports: Iterable[int] | None = None, n: int | None = None,
                timeout: float = 30.0) -> list[Conn]:
        """Open TCP connections to vip:port (from the given source ports, or n ephemeral ones) and read
        each one's greeting.  Connections stay open (closed at teardown or by Conn.close())."""
        if sports is None:
            if n is None:
                raise ValueError("give sports or n")
            ports: list[int] = [0] * n
        else:
            ports = list(sports)
        conns: list[Conn] = []
        ipv6 = ":" in vip
        for sport in ports:
            s = self.socket(socket.AF_INET6 if ipv6 else socket.AF_INET)
            self._bed.sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.settimeout(timeout)
            s.bind((self.address6 if ipv6 else self.address, sport))
            s.connect((vip, port))
            conns.append(Conn(s.getsockname()[1], "", s, timeout))
        for c in conns:
            c.backend = c._line()
        return conns

    def udp(self, vip: str, port: int, sports: Iterable[int], timeout: float = 30.0) -> list[str]:
        """Send one datagram to vip:port from each source port; return who answered each."""
        answers = []
        for sport in sports:
            s = self.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.settimeout(timeout)
                s.bind((self.address, sport))
                s.sendto(b"?\n", (vip, port))
                data, _ = s.recvfrom(256)
                answers.append(data.decode().strip())
            finally:
                s.close()
        return answers


class Topology:
    def __init__(self, bed: Bed, directors: int, backends: int, clients: int, routed: bool = False):
        if not (1 <= directors <= MAX_DIRECTORS and 1 <= backends <= MAX_BACKENDS and 1 <= clients <= MAX_CLIENTS):
            raise ValueError(f"topology wants 1-{MAX_DIRECTORS} directors, 1-{MAX_BACKENDS} backends, "
                             f"1-{MAX_CLIENTS} clients; got {directors}/{backends}/{clients}")
        self._bed = bed
        self.prefix = f"mb{secrets.token_hex(3)}"
        self.bridge = Netns(f"{self.prefix}-br", bed)
        bed.add_netns(self.bridge.name)
        self.router: Node | None = None
        if routed:
            self.router = Node(f"{self.prefix}-rt", bed, "rt", 0, ROUTER_ADDRESS, self.bridge)
            self.router.address6 = ROUTER_ADDRESS6
            bed.add_netns(self.router.name)
        client_segment = self.router or self.bridge
        self.directors = [self._node(Director, f"d{i}", i, director_address(i)) for i in range(1, directors + 1)]
        self.backends = [self._node(Backend, f"b{i}", i, backend_address(i)) for i in range(1, backends + 1)]
        self.clients = [self._node(Client, f"c{i}", i, client_address(i), client_segment)
                        for i in range(1, clients + 1)]
        self.client = self.clients[0]
        if routed:
            for nodes, address6 in ((self.directors, director_address6), (self.backends, backend_address6),
                                    (self.clients, client_address6)):
                for node in nodes:
                    node.address6 = address6(node.index)
        # (batched: every exec costs ~0.1 s in the emulated VM)
        bridge = ["link set lo up", "link add br0 type bridge stp_state 0 forward_delay 0", "link set br0 up"]
        underlay = [*([self.router] if self.router else []), *self.directors, *self.backends]
        for node in underlay if self.router else self.nodes:
            bridge += [f"link add {node.label} type veth peer name eth0 netns {node.name}",
                       f"link set {node.label} master br0 up"]
        self.bridge.ip_batch(bridge)
        if self.router:
            self.router.ip_batch(["link set lo up", "link set eth0 up", f"addr add {ROUTER_ADDRESS}/24 dev eth0",
                                  f"addr add {ROUTER_ADDRESS6}/64 dev eth0 nodad",
                                  "link add brc type bridge stp_state 0 forward_delay 0", "link set brc up",
                                  f"addr add {ROUTER_CLIENT_ADDRESS}/24 dev brc",
                                  f"addr add {ROUTER_CLIENT_ADDRESS6}/64 dev brc nodad",
                                  *(cmd for c in self.clients for cmd in (
                                      f"link add {c.label} type veth peer name eth0 netns {c.name}",
                                      f"link set {c.label} master brc up"))])
            for key, value in ROUTER_SYSCTLS.items():
                self.router.sysctl(key, value)
            for client in self.clients:
                for key, value in CLIENT_SYSCTLS.items():
                    client.sysctl(key, value)
        for node in self.nodes:
            cmds = ["link set lo up", "link set eth0 up", f"addr add {node.address}/24 dev eth0"]
            if self.router:
                cmds += [f"addr add {node.address6}/64 dev eth0 nodad"]
            if isinstance(node, Client) and self.router:
                cmds += [f"route add default via {ROUTER_CLIENT_ADDRESS} dev eth0",
                         f"route add default via {ROUTER_CLIENT_ADDRESS6} dev eth0"]
            elif isinstance(node, Client):
                cmds += [f"route add {UNDERLAY_NET} dev eth0 scope link",
                         f"route replace {VIP_NET} via {self.directors[0].address} dev eth0"]
            elif self.router:
                cmds += [f"route add {CLIENT_NET} via {ROUTER_ADDRESS} dev eth0",
                         f"route add {CLIENT6_NET} via {ROUTER_ADDRESS6} dev eth0"]
            else:
                cmds += [f"route add {c.address}/32 dev eth0 scope link" for c in self.clients]
            node.ip_batch(cmds)

    def _node(self, cls: Callable[..., Node], label: str, index: int, address: str,
              segment: Netns | None = None) -> Any:
        node = cls(f"{self.prefix}-{label}", self._bed, label, index, address, segment or self.bridge)
        self._bed.add_netns(node.name)
        return node

    @property
    def nodes(self) -> list[Node]:
        return [*self.directors, *self.backends, *self.clients]

    def serve(self, port: int = 80, proto: str = "tcp", backends: Iterable[Backend] | None = None,
              ipv6: bool = False) -> list[Server]:
        """Start echo servers on several backends at once (python starts slowly in the VM)."""
        servers = [b.start_server(port, proto, ipv6=ipv6) for b in (self.backends if backends is None else backends)]
        for s in servers:
            s.wait_ready()
        return servers

    # The seed's hand configuration (shared/seeds: "Example Load Balancer / Application Server
    # Configuration"), one backend tunnel per backend; `ip link set ... up` is implied in the post.

    def seed_director(self, director: Director, vips: Iterable[str], port: int = 80,
                      backends: Iterable[Backend] | None = None, scheduler: str = "mh",
                      flags: Sequence[str] = (), proto: str = "tcp") -> None:
        """The seed's load balancer commands, run in one shell in the director's namespace (may be called
        again for more VIPs: existing tunnels and the local VIP route are kept)."""
        d = director
        members = list(self.backends if backends is None else backends)
        cmds = []
        for b in members:
            tun = f"lbtun{b.index}"
            cmds.append(f"ip link show {tun} >/dev/null 2>&1 || {{ "
                        f"ip link add name {tun} type ipip remote {b.address} local {d.address} ttl 2 "
                        f"encap fou encap-sport auto encap-dport {FOU_PORT}; "
                        f"ip link set {tun} up; "
                        f"ip route add {b.tunnel_address} dev {tun} scope link; }}")
        cmds.append(f"ip route show table local | grep -q 'local {VIP_NET} ' || "
                    f"ip route add table local local {VIP_NET} dev lo proto kernel")
        flag = {"tcp": "-t", "udp": "-u"}[proto]
        bflags = f" -b {','.join(flags)}" if flags else ""
        for v in vips:
            cmds.append(f"ipvsadm -A {flag} {v}:{port} -s {scheduler}{bflags}")
            cmds += [f"ipvsadm -a {flag} {v}:{port} -r {b.tunnel_address}:{port}" for b in members]
        d.sh("set -ex\n" + "\n".join(cmds))

    def seed_backend(self, backend: Backend, vips: Iterable[str]) -> None:
        """The seed's application server commands (plus the VIPs on lo and the ARP sysctls), in one shell."""
        cmds = [f"ip fou add port {FOU_PORT} ipproto 4",
                "ip link set dev tunl0 up",
                "sysctl -qw net.ipv4.conf.tunl0.rp_filter=0",
                "sysctl -qw net.ipv4.conf.all.rp_filter=0",
                *(f"ip addr add {v}/32 dev lo" for v in vips),
                "sysctl -qw net.ipv4.conf.all.arp_ignore=1",
                "sysctl -qw net.ipv4.conf.all.arp_announce=2"]
        backend.sh("set -ex\n" + "\n".join(cmds))
