"""The failover bed: clients behind a real router (BIRD, ECMP, BFD) in front of directors that only the agent
configures (``maglev-bridge run`` as a real process in each director's namespace, a catalog file), backends
serving one VIP, and the traffic recorder holding long-lived connections through it all.

Shared by tests/kernel/test_failover.py and bench/failover.py.  Nothing here sets a sysctl or a route on a
director: the agent sets its sysctls, puts its announce routes in the table BIRD learns, and
``maglev-bridge maintenance`` withdraws them.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.harness.addresses import vip
from tests.harness.agent import AgentHarness
from tests.harness.netns import VENV_PYTHON, Bed, Netns
from tests.harness.router_bed import ANNOUNCE_TABLE, EXAMPLE_BFD, RouterBed, RouteWatcher
from tests.harness.topology import Director, Topology
from tests.harness.traffic import Recording, Traffic
from tests.harness.wait import wait_until

VIP = vip(1)
PORT = 80
CONNECTIONS = 60
SPORTS = range(40000, 40000 + CONNECTIONS)


class RoutedAgents(AgentHarness):
    """Director agents that announce (a ``bgp`` section, each with its own maintenance file), optionally with
    IPVS connection synchronisation, and optionally reading another catalog path than the shared one."""

    def __init__(self, topology: Topology, conn_sync: bool = False, **config: Any):
        self.conn_sync = conn_sync
        self.catalog_of: dict[str, Path] = {}
        super().__init__(topology, **config)

    def node_config(self, node: Netns, role: str) -> dict[str, Any]:
        if role != "director":
            return {}
        label = getattr(node, "label", node.name)
        extra: dict[str, Any] = {"bgp": {"table": ANNOUNCE_TABLE,
                                         "maintenance_file": str(self.dir / f"{label}-maintenance"),
                                         "bird_socket": str(self.dir / f"bird-{label}.ctl")}}  # RouterBed's
        if self.conn_sync:
            extra["conn_sync"] = {"interface": "eth0", "syncid": 1}
        if label in self.catalog_of:
            extra["catalog_file"] = str(self.catalog_of[label])
        return extra


class FailoverBed:
    """directors x backends behind the router; ``start()`` brings everything up and waits until the router
    routes the VIP over every director the agent announced from."""

    def __init__(self, bed: Bed, directors: int = 3, backends: int = 3, conn_sync: bool = False,
                 bfd: bool = True, bfd_timing: tuple[int, int] = EXAMPLE_BFD):
        self.topology = Topology(bed, directors, backends, 1, routed=True)
        # resync every 300 s (the agent's default): three agents' full passes every 30 s stalled the emulated
        # VM (and so the recorder) for ~0.7 s every ~10 s
        self.agents = RoutedAgents(self.topology, conn_sync=conn_sync, resync_interval=300)
        self.router = RouterBed(self.topology, self.agents.dir, bfd=bfd, bfd_timing=bfd_timing)
        self.procs: dict[str, Any] = {}
        self.watcher: RouteWatcher | None = None
        self.traffic: Traffic | None = None

    @property
    def directors(self) -> list[Director]:
        return self.topology.directors

    def start(self, directors: Iterable[Director] | None = None) -> None:
        for b in self.topology.backends:
            self.agents.instance("web", b)
        servers = [b.start_server(PORT) for b in self.topology.backends]
        self.router.start()
        self.watcher = self.router.watch(VIP)
        starting = list(self.directors if directors is None else directors)
        for d in starting:
            self.start_agent(d)
        self.agents.apply_backends()
        for s in servers:
            s.wait_ready()
        self.wait_route(starting, timeout=300)

    def start_agent(self, director: Director) -> None:
        self.procs[director.label] = self.agents.start(director)

    def stop_agent(self, director: Director) -> int:
        return self.agents.stop(self.procs.pop(director.label))

    def dropped(self, director: Director, since: float) -> float:
        """When the router's route first went without this director after `since` (wait_route first)."""
        assert self.watcher is not None
        return next(t for t, hops in self.watcher.changes if t > since and director.address not in hops)

    def watch_announcement(self, director: Director) -> RouteWatcher:
        """The director's own announce route (its table that BIRD learns), to time a withdraw's way from the
        director's kernel to the router's.  Stopped at teardown by the caller (watcher.stop())."""
        watcher = RouteWatcher(director, VIP, table=ANNOUNCE_TABLE)
        watcher.start()
        return watcher

    def wait_route(self, directors: Iterable[Director], timeout: float = 60) -> float:
        """Until the router's route to the VIP goes over exactly these directors; returns when it did."""
        want = frozenset(d.address for d in directors)
        assert self.watcher is not None
        wait_until(lambda: self.watcher.current() == want, timeout=timeout, interval=0.05,  # type: ignore[union-attr]
                   what=f"router route to {VIP} via {sorted(want)}")
        return self.watcher.changes[-1][0]

    def settle(self, directors: Iterable[Director] | None = None, quiet: float = 3, timeout: float = 180) -> None:
        """Until the router's route has gone over exactly these directors (default: all) for `quiet` seconds.
        Under emulation and load, BFD at 100 ms x 3 sometimes declares a busy director down (counted by
        RouterBed.router_bird.bfd_downs()); a test starts its connections on a quiet route."""
        want = frozenset(d.address for d in (self.directors if directors is None else directors))
        assert self.watcher is not None
        watcher = self.watcher
        wait_until(lambda: watcher.current() == want and time.monotonic() - watcher.changes[-1][0] >= quiet,
                   timeout=timeout, interval=0.2, what=f"router route via {sorted(want)} for {quiet} s")

    def bfd_report(self) -> str:
        bird = self.router.router_bird
        return f"BFD sessions down on the router: {len(bird.bfd_downs())}, of which whole-VM stalls: {bird.stalls()}"

    def maintenance(self, director: Director, action: str) -> str:
        args = ["maintenance", action] + (["--reason", "failover test"] if action == "on" else [])
        return self.agents.cli(director, "director", *args).stdout

    def start_traffic(self, out: Path | None = None) -> Traffic:
        """Start the recorder's connections on a quiet route (see settle)."""
        self.settle([d for d in self.directors if d.label in self.procs])
        self.traffic = Traffic(self.topology.client, VIP, PORT, SPORTS, out or self.agents.dir / "traffic.json",
                               VENV_PYTHON, sample={d.label: self.router.bird(d).pid for d in self.directors})
        self.traffic.wait_ready()
        return self.traffic

    def stop_traffic(self) -> Recording:
        assert self.traffic is not None
        rec = self.traffic.stop()
        self.traffic = None
        return rec

    def connections_by_director(self) -> dict[str, set[int]]:
        """Client ports of the established connections each director's IPVS holds (the kernel's word)."""
        client = self.topology.client.address
        out: dict[str, set[int]] = {}
        for d in self.directors:
            listing = d.ipvsadm("-Lnc")
            out[d.label] = {int(p) for p in re.findall(rf"ESTABLISHED\s+{re.escape(client)}:(\d+)", listing)}
        return out

    def hold(self, seconds: float) -> None:
        """Let the traffic run (the recorder measures; nothing is waited for)."""
        time.sleep(seconds)

    def diagnostics(self) -> str:
        parts = [self.router.logs()]
        for d in self.directors:
            parts.append(f"--- agent {d.label}\n{self.agents.log(d)[-3000:]}")
        return "\n".join(parts)

    def keep(self, folder: Path) -> None:
        """Copy the bed's logs and recordings (for a failed run or the benchmark's picture)."""
        shutil.copytree(self.agents.dir, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.ctl"))
