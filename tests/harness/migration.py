"""The fou -> gue migration bed: two directors configured by hand the way the agent configures them (the
seed's ipip+FOU links and routes, an IPVS service with the Maglev scheduler, direct routing to the backends'
tunnel addresses, the agent's sysctls, connection sync daemons), backends receiving on a FOU port and a GUE
port, and a router in front with a static ECMP route to the VIP, so that moving flows between directors is
one route change (BGP and BFD add nothing to what is measured here; tests/kernel/test_failover.py covers them).

``MigrationBed`` is a prototype of the kernel steps of docs/gue-migration.md, driven with ipvsadm and ip
exactly as the runbook's steps change the kernel: each method is one step.  ``AgentMigrationBed`` lets the
agent (``maglev-bridge apply``) do the steps it knows.  Real servers of the two encapsulations:

* ``fou``: the backend's tunnel address (tests.harness.addresses.tunnel_address by hand, the agent harness's
  tunnel_map through the agent), direct routing (``-g``),
  carried by the per-backend ipip link with FOU encapsulation and its /32 route;
* ``gue``: the backend's own address, IPVS tunnel forwarding with GUE to port GUE_PORT
  (``-i --tun-type gue --tun-port 6080``), no link, no route.

Every edit of a real server repeats its forwarding: ``ipvsadm -e`` without it sets direct routing.
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tests.harness.addresses import FOU_PORT, vip
from tests.harness.agent import AgentHarness, tunnel_of
from tests.harness.netns import VENV_PYTHON, Bed
from tests.harness.topology import Backend, Director, Topology
from tests.harness.traffic import Traffic

Mode = Literal["fou", "gue"]
VIP = vip(1)
PORT = 80
GUE_PORT = 6080
SERVICE = f"-t {VIP}:{PORT}"
FLAGS = "mh-port,mh-fallback"
SYNC_ID = 1
AGENT_SYSCTLS = {"net.ipv4.vs.sloppy_tcp": 1, "net.ipv4.vs.expire_nodest_conn": 1}
"""The agent's director sysctls (README, "The director's sysctls")."""
TIMEOUTS = "900 10 300"
"""IPVS's timeouts (``ipvsadm --set tcp tcpfin udp``): the kernel's defaults but 10 s instead of 120 s for an entry
in FIN_WAIT, the state a closed connection's entry stays in on a director that sees only the client's side, so
that the last step, which waits until no entry is left on the fou real servers, waits 10 s and not 2 minutes."""
FORWARDING: dict[Mode, str] = {"fou": "-g", "gue": f"-i --tun-type gue --tun-port {GUE_PORT}"}


class MigrationBed:
    """Directors x backends behind a router; ``start()`` configures everything in `fou` mode with connection
    sync (every director master and backup, one syncid, as the agent's ``conn_sync`` does)."""

    def __init__(self, bed: Bed, directors: int = 2, backends: int = 3):
        self.topology = Topology(bed, directors, backends, 1, routed=True)
        self.folder = bed.tmpdir
        self.traffics: list[Traffic] = []

    @property
    def directors(self) -> list[Director]:
        return self.topology.directors

    @property
    def backends(self) -> list[Backend]:
        return self.topology.backends

    def start(self) -> None:
        servers = [b.start_server(PORT) for b in self.backends]
        for b in self.backends:
            self.topology.seed_backend(b, [VIP])
        self.receive(["fou", "gue"])
        for d in self.directors:
            self._director(d)
        self.route(self.directors)
        for s in servers:
            s.wait_ready()

    def real_server(self, backend: Backend, mode: Mode) -> str:
        """The address IPVS is given for this backend in this encapsulation."""
        return backend.tunnel_address if mode == "fou" else backend.address

    def _director(self, d: Director) -> None:
        links = []
        for b in self.backends:
            name = f"mgl{b.index:08x}"
            links += [f"link add name {name} type ipip remote {b.address} local {d.address} ttl 64 "
                      f"encap fou encap-sport auto encap-dport {FOU_PORT}",
                      f"link set {name} up",
                      f"route add {b.tunnel_address}/32 dev {name} scope link",]
        d.ip_batch([*links, f"route add table local local {VIP}/32 dev lo proto kernel"])
        for key, value in AGENT_SYSCTLS.items():
            d.sysctl(key, value)
        self.ipvs(d, [f"-A {SERVICE} -s mh -b {FLAGS}",
                      *(f"-a {SERVICE} -r {b.tunnel_address}:{PORT} -g -w 1" for b in self.backends)])
        self.timeouts(d)
        d.sh(f"ipvsadm --start-daemon master --mcast-interface eth0 --syncid {SYNC_ID} && "
             f"ipvsadm --start-daemon backup --mcast-interface eth0 --syncid {SYNC_ID}")

    @staticmethod
    def ipvs(d: Director, rules: Iterable[str]) -> None:
        """ipvsadm commands in one process (``ipvsadm -R``), in order: one exec costs ~0.1 s in the VM."""
        d.run("ipvsadm", "-R", input="\n".join(rules) + "\n")

    # ------------------------------------------------------------------ the runbook's steps, per director

    def receive(self, modes: Iterable[Mode]) -> None:
        """Backends: exactly these receivers (FOU port FOU_PORT for ipip, GUE port GUE_PORT)."""
        wanted = set(modes)
        for b in self.backends:
            have = b.run("ip", "fou", "show").stdout
            cmds = []
            for mode, port, add in (("fou", FOU_PORT, "ipproto 4"), ("gue", GUE_PORT, "gue")):
                present = re.search(rf"port {port}\b", have) is not None
                if mode in wanted and not present:
                    cmds.append(f"ip fou add port {port} {add}")
                elif mode not in wanted and present:
                    cmds.append(f"ip fou del port {port}")
            if cmds:
                b.sh(" && ".join(cmds))

    def add_standby(self, d: Director, mode: Mode) -> None:
        """This encapsulation's real servers at weight 0, added at weight 0: the kernel never saw a weight for
        them, so ip_vs_mh gives them no slot (it builds its table from each real server's last non-zero
        weight) and the Maglev table does not change; connections synced from a director in that mode are
        bound to them and forwarded with their encapsulation."""
        self.ipvs(d, [f"-a {SERVICE} -r {self.real_server(b, mode)}:{PORT} {FORWARDING[mode]} -w 0"
                      for b in self.backends])

    def set_weights(self, d: Director, mode: Mode, weight: int) -> None:
        self.ipvs(d, [f"-e {SERVICE} -r {self.real_server(b, mode)}:{PORT} {FORWARDING[mode]} -w {weight}"
                      for b in self.backends])

    def switch(self, d: Director, old: Mode, new: Mode) -> None:
        """The new encapsulation's real servers get their weights, the old ones drain at weight 0: nothing is
        deleted, so every connection keeps its real server (and its forwarding)."""
        self.set_weights(d, new, 1)
        self.set_weights(d, old, 0)

    def delete_real_servers(self, d: Director, mode: Mode) -> None:
        self.ipvs(d, [f"-d {SERVICE} -r {self.real_server(b, mode)}:{PORT}" for b in self.backends])

    def add_real_servers(self, d: Director, mode: Mode, weight: int = 1) -> None:
        self.ipvs(d, [f"-a {SERVICE} -r {self.real_server(b, mode)}:{PORT} {FORWARDING[mode]} -w {weight}"
                      for b in self.backends])

    def delete_links(self, d: Director) -> None:
        d.ip_batch([f"link del mgl{b.index:08x}" for b in self.backends])

    def remove_fou(self, d: Director) -> None:
        """Step 3 on one director: its fou real servers, then its links and routes."""
        self.delete_real_servers(d, "fou")
        self.delete_links(d)

    def timeouts(self, d: Director) -> None:
        """IPVS's timeouts as TIMEOUTS says (the agent never changes them)."""
        d.sh(f"ipvsadm --set {TIMEOUTS}")

    def links(self, d: Director) -> list[str]:
        return [line.split(":")[1].strip().split("@")[0] for line in d.ip("-o", "link", "show").stdout.splitlines()
                if line.split(":")[1].strip().startswith("mgl")]

    # ------------------------------------------------------------------------------- the router

    def route(self, directors: Iterable[Director]) -> None:
        """The router's route to the VIP over exactly these directors (ECMP on the 5-tuple)."""
        hops = [d.address for d in directors]
        assert self.topology.router is not None
        if len(hops) == 1:
            self.topology.router.ip("route", "replace", f"{VIP}/32", "via", hops[0], "dev", "eth0")
        else:
            nexthops = [w for h in hops for w in ("nexthop", "via", h, "dev", "eth0")]
            self.topology.router.ip("route", "replace", f"{VIP}/32", *nexthops)

    # ----------------------------------------------------------------------------- witnesses

    def traffic(self, sports: range, label: str, interval: float = 0.1) -> Traffic:
        """Long-lived connections from these client ports, each asking every `interval` seconds, recorded
        (tests.harness.traffic)."""
        t = Traffic(self.topology.client, VIP, PORT, sports, self.folder / f"traffic-{label}.json", VENV_PYTHON,
                    interval=interval)
        self.traffics.append(t)
        t.wait_ready()
        return t

    def entries(self, d: Director) -> set[int]:
        """Client ports of the ESTABLISHED connection entries this director holds (its own and synced ones)."""
        client = re.escape(self.topology.client.address)
        return {int(p) for p in re.findall(rf"ESTABLISHED\s+{client}:(\d+)", d.ipvsadm("-Lnc"))}

    def real_servers(self, d: Director) -> dict[str, tuple[str, int, int, int]]:
        """address -> (forwarding, weight, active, inactive connections), from ``ipvsadm -Ln``."""
        out: dict[str, tuple[str, int, int, int]] = {}
        for m in re.finditer(r"->\s+([\d.]+):\d+\s+(\w+)\s+(\d+)\s+(\d+)\s+(\d+)", d.ipvsadm("-Ln")):
            out[m.group(1)] = (m.group(2), int(m.group(3)), int(m.group(4)), int(m.group(5)))
        return out

    def packets(self, d: Director) -> dict[str, int]:
        """address -> packets IPVS sent to that real server so far (``--stats``; refreshed every 2 s)."""
        out: dict[str, int] = {}
        for m in re.finditer(r"->\s+([\d.]+):\d+\s+\d+\s+(\d+)", d.ipvsadm("-Ln", "--stats", "--exact")):
            out[m.group(1)] = int(m.group(2))
        return out

    def probe(self, sports: Iterable[int]) -> dict[int, str]:
        """Open one connection from each client port, read which backend answers, close it: the backend each
        director's Maglev table picks for new flows (the router spreads them over the directors)."""
        conns = self.topology.client.connect(VIP, PORT, sports=sports)
        for c in conns:  # closed by a reset: no TIME_WAIT, so the same ports can probe again at once
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
        return {c.sport: c.backend for c in conns}

    def keep(self, folder: Path) -> None:
        """Copy the recordings and logs (for a failed run)."""
        shutil.copytree(self.folder, folder, dirs_exist_ok=True)


class AgentMigrationBed(MigrationBed):
    """The same bed with the agent doing what it does: ``maglev-bridge apply`` configures the backends (both
    receivers) and the directors (fou, `standby_encapsulation: gue` for step 1, then `encapsulation: gue`), with
    connection sync and a drain_timeout longer than the test, so that it keeps the fou real servers at weight 0
    after the switch, and deletes them in step 3 (`retire_encapsulation: fou`)."""

    def __init__(self, bed: Bed, directors: int = 2, backends: int = 3):
        super().__init__(bed, directors, backends)
        self.agents = AgentHarness(self.topology, drain_timeout=3600, resync_interval=300, receive=["fou", "gue"],
                                   gue_port=GUE_PORT, conn_sync={"interface": "eth0", "syncid": SYNC_ID})

    def real_server(self, backend: Backend, mode: Mode) -> str:
        return tunnel_of(backend) if mode == "fou" else backend.address

    def start(self) -> None:
        for b in self.backends:
            self.agents.instance("web", b)
        servers = [b.start_server(PORT) for b in self.backends]
        self.agents.apply_backends()
        for d in self.directors:
            self.agents.apply(d)
            self.timeouts(d)
        self.route(self.directors)
        for s in servers:
            s.wait_ready()

    def add_standby(self, d: Director, mode: Mode) -> None:
        """`standby_encapsulation: gue` in the director's configuration, applied: the agent adds the standby
        real servers at weight 0 and keeps them there."""
        self.agents.config_overrides["standby_encapsulation"] = mode
        self.agents.apply(d)

    def switch(self, d: Director, old: Mode, new: Mode) -> None:
        """`encapsulation: gue` in the director's configuration and `standby_encapsulation` removed (a standby
        of the director's own encapsulation is a configuration error), applied (SIGHUP does the same to a
        running agent)."""
        self.agents.config_overrides.update(encapsulation=new, standby_encapsulation=None)
        self.agents.apply(d)

    def remove_fou(self, d: Director) -> None:
        """`retire_encapsulation: fou` in the director's configuration, applied: the agent deletes the fou real
        servers if none holds a connection entry, and the links and routes with them in the same pass."""
        self.agents.config_overrides["retire_encapsulation"] = "fou"
        self.agents.apply(d)
