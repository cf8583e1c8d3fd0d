"""A real router in front of the directors: BIRD 2 with BGP + BFD to one BIRD per director, ECMP into the
router's kernel (``Topology(routed=True)`` builds the namespaces; see tests/harness/README.md).

Every BIRD runs the example configuration of examples/ (bird-router.conf, bird-director.conf) with only
addresses and paths filled in, as its own process (``bird -f -c CONF -s SOCK -P PID``) in its node's
namespace, so each has its own control socket for ``birdc``.  Nothing here touches a director's IPVS, sysctls
or announce table: that is the agent's job.

``RouteWatcher`` records every change of the router's route to a VIP (the set of next hops, i.e. directors)
with ``time.monotonic()`` from a netlink socket inside the router's namespace, so a test can measure how long
a withdraw or a failure takes to reach the router's forwarding table.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import string
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute

from tests.harness.addresses import ROUTER_ADDRESS, VIP6_NET, VIP_NET
from tests.harness.topology import Director, Node, Topology
from tests.harness.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]
ROUTER_CONF = ROOT / "examples" / "bird-router.conf"
DIRECTOR_CONF = ROOT / "examples" / "bird-director.conf"
ROUTER_AS, DIRECTOR_AS = 64512, 64513
ANNOUNCE_TABLE, ROUTE_PROTOCOL = 245, 245
VIP_SET, VIP6_SET = f"{VIP_NET}{{32,32}}", f"{VIP6_NET}{{128,128}}"
RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, NETLINK_ROUTE = 0x40, 0x400, 0
EXAMPLE_BFD = (100, 3)
"""The examples' BFD timing: (interval ms, multiplier)."""
CALM_BFD = (500, 4)
"""BFD timing for what does not measure failure detection (maintenance, restart, first pass, drain): the
examples' 100 ms x 3 declares every director down at once whenever the emulated VM stalls for more than
300 ms: on the loaded 2-core machine, 54 BFD sessions went down in one 4-minute test and, in another, 20
times all at the same instant (measured; see RouterBed.stalls).  Such a run tests the machine, not the
agent."""


def render(template: Path, **values: object) -> str:
    """The example file with its ${...} placeholders filled (a missing one is an error)."""
    return string.Template(template.read_text()).substitute({k: str(v) for k, v in values.items()})


class Bird:
    """One BIRD daemon in a node's namespace, with its own control socket."""

    def __init__(self, node: Node, config: str, folder: Path):
        self.node = node
        self.folder = folder
        self.conf = folder / f"bird-{node.label}.conf"
        self.socket = folder / f"bird-{node.label}.ctl"
        self.log = folder / f"bird-{node.label}.log"
        self.conf.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # `ip netns exec` execs bird, so proc.pid is BIRD's pid (/proc/PID/net is the node's namespace)
        self.proc = self.node.popen("bird", "-f", "-c", str(self.conf), "-s", str(self.socket),
                                    "-P", str(self.folder / f"bird-{self.node.label}.pid"))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def birdc(self, *command: str) -> str:
        proc = subprocess.run(["birdc", "-s", str(self.socket), *command], capture_output=True, text=True,
                              timeout=30, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"birdc {' '.join(command)} on {self.node.label}: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def established(self) -> set[str]:
        """Names of the BGP protocols whose session is Established."""
        return {line.split()[0] for line in self.birdc("show", "protocols").splitlines()
                if " BGP " in line and "Established" in line}

    def bfd_up(self) -> set[str]:
        """Neighbour addresses of the BFD sessions that are Up."""
        return {line.split()[0] for line in self.birdc("show", "bfd", "sessions").splitlines()
                if re.search(r"\bUp\b", line)}

    def bfd_downs(self) -> list[tuple[float, str]]:
        """(seconds of the day, neighbour) of every BFD session that went from Up to Down (BFD session
        tracing must be on: RouterBed turns it on for the router)."""
        out = []
        for m in re.finditer(r"(\d\d):(\d\d):(\d\d\.\d+) <TRACE> bfd1: Session to (\S+) changed state from Up to "
                             r"Down", self.log_text()):
            out.append((int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]), m[4]))
        return out

    def stalls(self) -> int:
        """How many times several BFD sessions expired within the same 10 ms: not a failed link (one
        director) but this BIRD, or the whole emulated machine, not running for longer than the detection
        time."""
        downs = self.bfd_downs()
        groups = 0
        i = 0
        while i < len(downs):
            j = i
            while j + 1 < len(downs) and downs[j + 1][0] - downs[i][0] < 0.01:
                j += 1
            groups += len({n for _, n in downs[i:j + 1]}) > 1
            i = j + 1
        return groups

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class RouteWatcher:
    """Every state of a node's route to one VIP of either family (default: the router's, in its main table), as
    (monotonic time, next-hop addresses).  A thread inside the router's namespace waits on a netlink socket
    subscribed to the VIP family's route changes and, on each, reads the VIP's next hops again (no ip exec
    per sample: each costs ~0.1 s in the emulated VM).  The subscription
    is a plain stdlib socket because pyroute2 0.9's IPRoute does not deliver notifications to a thread other
    than the one that made it."""

    router: Node
    vip: str
    table: int = 254
    changes: list[tuple[float, frozenset[str]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _ready: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"route-watch-{self.vip}", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise AssertionError("route watcher did not start")

    def nexthops(self) -> frozenset[str]:
        with self.router.entered():
            return self._read()

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.vip else socket.AF_INET

    def _read(self) -> frozenset[str]:
        with IPRoute() as ipr:
            routes = ipr.route("dump", family=self.family, dst=self.vip,
                               dst_len=128 if self.family == socket.AF_INET6 else 32, table=self.table)
        hops: set[str] = set()
        for r in routes:
            if r.get_attr("RTA_DST") != self.vip:
                continue
            multipath = r.get_attr("RTA_MULTIPATH") or []
            for nh in multipath:
                hops.add(nh.get_attr("RTA_GATEWAY"))
            if not multipath:  # one next hop, or none (the agent's blackhole announce route)
                hops.add(r.get_attr("RTA_GATEWAY") or "no gateway")
        return frozenset(hops)

    def _loop(self) -> None:
        with self.router.entered(), socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sub:
            sub.bind((0, RTMGRP_IPV6_ROUTE if self.family == socket.AF_INET6 else RTMGRP_IPV4_ROUTE))
            sub.setblocking(False)
            self.changes.append((time.monotonic(), self._read()))
            self._ready.set()
            while not self._stop.is_set():
                if not select.select([sub], [], [], 0.2)[0]:
                    continue
                now = time.monotonic()
                with contextlib.suppress(BlockingIOError):
                    while sub.recv(65536):
                        pass
                hops = self._read()
                if hops != self.changes[-1][1]:
                    self.changes.append((now, hops))

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def current(self) -> frozenset[str]:
        return self.changes[-1][1]

    def first_change_after(self, t: float) -> tuple[float, frozenset[str]] | None:
        return next(((ts, hops) for ts, hops in self.changes if ts > t), None)


class RouterBed:
    """The router's BIRD and one BIRD per director, started from the examples/ configurations."""

    def __init__(self, topology: Topology, folder: Path, bfd: bool = True,
                 bfd_timing: tuple[int, int] = EXAMPLE_BFD):
        """bfd=False runs the same examples with every `bfd on;` turned off: a dead director is then removed
        only when the BGP hold time expires (the benchmark's baseline; what routers without BFD do).

        bfd_timing=(interval ms, multiplier) other than the examples' (100 ms x 3) is for tests that do not
        measure failure detection: under emulation on a loaded machine the whole VM regularly stalls for more
        than 300 ms, and the router's BFD then declares every director down at the same instant (see
        stalls()); such a test uses timings a stall cannot trip, and says so."""
        assert topology.router is not None, "RouterBed needs topology(routed=True)"
        self.topology = topology
        self.router = topology.router
        self.folder = folder
        neighbours = "\n".join(f"protocol bgp {d.label} from director {{ neighbor {d.address} as {DIRECTOR_AS}; }}"
                               for d in topology.directors)
        self.router_bird = Bird(self.router, render(
            ROUTER_CONF, log_file=folder / "bird-rt.log", router_id=ROUTER_ADDRESS, local_address=ROUTER_ADDRESS,
            interface="eth0", local_as=ROUTER_AS, vip_cidrs=VIP_SET, vip6_cidrs=VIP6_SET,
            directors=neighbours), folder)
        self.birds = {d.label: Bird(d, render(
            DIRECTOR_CONF, log_file=folder / f"bird-{d.label}.log", router_id=d.address, local_address=d.address,
            interface="eth0", router_address=ROUTER_ADDRESS, local_as=DIRECTOR_AS, router_as=ROUTER_AS,
            vip_cidrs=VIP_SET, vip6_cidrs=VIP6_SET, local_address6=d.address6, table=ANNOUNCE_TABLE,
            route_protocol=ROUTE_PROTOCOL), folder)
            for d in topology.directors}
        for bird in [self.router_bird, *self.birds.values()]:
            text = bird.conf.read_text()
            if not bfd:
                text = text.replace("bfd on;", "bfd off;")
            if bfd_timing != EXAMPLE_BFD:
                interval, multiplier = bfd_timing
                for key in ("min rx interval", "min tx interval"):
                    assert f"{key} {EXAMPLE_BFD[0]} ms;" in text, f"the example's BFD {key} changed"
                    text = text.replace(f"{key} {EXAMPLE_BFD[0]} ms;", f"{key} {interval} ms;")
                text = text.replace(f"multiplier {EXAMPLE_BFD[1]};", f"multiplier {multiplier};")
            bird.conf.write_text(text)
        self.bfd = bfd

    def start(self, timeout: float = 120) -> None:
        """Start every BIRD and wait until every BGP session and BFD session is up."""
        self.router_bird.start()
        for bird in self.birds.values():
            bird.start()
        labels = {d.label for d in self.topology.directors}
        wait_until(lambda: self._sockets_ready(), timeout=timeout, what="BIRD control sockets")
        if self.bfd:
            # log the router's BFD session changes (not the examples' business: a test's witness)
            self.router_bird.birdc("debug", "bfd1", "{", "states", ",", "events", "}")
        wait_until(lambda: self.router_bird.established() == labels, timeout=timeout,
                   what=f"BGP sessions {sorted(labels)} Established on the router")
        addresses = {d.address for d in self.topology.directors}
        if self.bfd:
            wait_until(lambda: self.router_bird.bfd_up() >= addresses, timeout=timeout,
                       what="BFD sessions up on the router")

    def _sockets_ready(self) -> bool:
        return all(b.socket.exists() for b in [self.router_bird, *self.birds.values()])

    def bird(self, director: Director) -> Bird:
        return self.birds[director.label]

    def watch(self, vip: str) -> RouteWatcher:
        watcher = RouteWatcher(self.router, vip)
        watcher.start()
        return watcher

    def nexthops(self, vip: str) -> frozenset[str]:
        return RouteWatcher(self.router, vip).nexthops()

    def wait_nexthops(self, vip: str, directors: Iterable[Director], timeout: float = 60) -> None:
        """Until the router routes `vip` over exactly these directors (their IPv6 addresses for an IPv6 VIP)."""
        want = frozenset(str(d.address6) if ":" in vip else d.address for d in directors)
        wait_until(lambda: self.nexthops(vip) == want, timeout=timeout,
                   what=f"router route to {vip} via {sorted(want)} (now {sorted(self.nexthops(vip))})")

    def logs(self) -> str:
        return "\n".join(f"--- BIRD {b.node.label}\n{b.log_text()[-3000:]}"
                         for b in [self.router_bird, *self.birds.values()])


@contextlib.contextmanager
def watching(bed: RouterBed, vip: str) -> Iterator[RouteWatcher]:
    watcher = bed.watch(vip)
    try:
        yield watcher
    finally:
        watcher.stop()
