"""`encapsulation: gue` with backends whose Consul address is IPv6 (an IPv6 underlay), through the agent's command
line: IPVS encapsulates an IPv6 VIP's packet in GUE over IPv6 to the backend's own address (tunnel forwarding),
the backend's fou takes it on an IPv6 GUE port and hands it to ip6_tunnel's `ip6tnl0` (which the backend role
brings up, leaving its mode and rp_filter as they were), and the backend answers the client directly (DSR).
`ipvsadm -Ln --tun-info` is the witness of each real server's address, tunnel type and port; the director creates
no link and no route per backend. An IPv4 VIP's claims by such backends are refused (the kernel's Maglev hashes
only the first 32 bits of their addresses) and build nothing."""

from __future__ import annotations

import re
import socket
import subprocess

import pytest

from bridge.core.config import load_config
from bridge.dataplane.backend import BackendKernel, BackendLive
from tests.catalog_builder import health_entry
from tests.harness.addresses import vip
from tests.harness.agent import AgentHarness
from tests.harness.wait import wait_until

pytestmark = pytest.mark.kernel
VIP6 = "2001:db8:10::10"
VIP4 = vip(1)


def tunnels(director, key):
    """address -> (forward method, tunnel info) of one service's real servers, from ipvsadm --tun-info."""
    out = director.ipvsadm("-Ln", "--tun-info", *key)
    return {m[1]: (m[2], m[3]) for m in re.finditer(r"->\s+\[?([\da-f:.]+?)\]?:\d+\s+(\w+)\s+(\S*)", out)}, out


def counters(director, flag: str, service: str) -> tuple[int, int, int]:
    """(connections, packets in, packets out) of one virtual service."""
    out = director.ipvsadm("-Ln", "--stats", "--exact", flag, service)
    line = next(line for line in out.splitlines() if line.startswith(("TCP", "UDP")))
    conns, inpkts, outpkts = (int(x) for x in line.split()[2:5])
    return conns, inpkts, outpkts


def ask(client, source: str, target: str, port: int, sports: range, *, udp: bool) -> list[str]:
    """One TCP connection (asked twice: it must stay on its backend) or one datagram per source port; the
    backends' names that answered."""
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    answers = []
    with client.entered():
        for sport in sports:
            with socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as s:
                s.settimeout(30)
                s.bind((source, sport))
                if udp:
                    s.sendto(b"?\n", (target, port))
                    answers.append(s.recvfrom(64)[0].decode().strip())
                    continue
                s.connect((target, port))
                first = s.recv(64).decode().strip()
                s.sendall(b"again\n")
                assert s.recv(64).decode().strip() == first, "a connection stays on its backend"
                answers.append(first)
    return answers


def dual_stack(topology, module: str):
    """One director, two backends and a client that also have IPv6 addresses (2001:db8:1::/64), the client
    routing the IPv6 VIPs (2001:db8:10::/64) to the director, and a `gue` agent serving both families; `module`
    loaded first (what the backend role names when its tunnel device is missing)."""
    subprocess.run(["modprobe", module], check=True)
    topo = topology(directors=1, backends=2, clients=1)
    d, client = topo.directors[0], topo.client
    v6 = {node.label: f"2001:db8:1::{i:x}" for i, node in enumerate(topo.nodes, 1)}
    for node in topo.nodes:
        node.ip_batch([f"addr add {v6[node.label]}/64 dev eth0 nodad"])
    client.ip_batch([f"route add 2001:db8:10::/64 via {v6[d.label]}"])
    agent = AgentHarness(topo, encapsulation="gue", tunnel_map=None, vip_cidrs=["198.51.100.0/24", "2001:db8:10::/64"])
    return topo, d, client, v6, agent


def backend_live(agent, b) -> BackendLive:
    """What the backend role reads on node `b`."""
    with b.entered():
        be = BackendKernel(load_config(agent.config_path(b, "backend")))
        try:
            return be.read()
        finally:
            be.close()


def test_ipv6_vips_over_an_ipv6_underlay_in_gue_mode_with_dsr_and_ipv4_vips_refused(topology):
    topo, d, client, v6, agent = dual_stack(topology, "ip6_tunnel")
    tags = {"web6": [f"maglev.vip=[{VIP6}]:80"], "dns6": [f"maglev.vip=[{VIP6}]:53/udp"],
            "web4": [f"maglev.vip={VIP4}:80"], "dns4": [f"maglev.vip={VIP4}:53/udp"]}
    servers = []
    for b in topo.backends:
        for service, claim in tags.items():
            agent.entries[(service, b.label)] = health_entry(service, b.label, v6[b.label], 53 if "dns" in service
                                                             else 80, claim, create_index=100 + b.index)
        servers += [b.start_server(80, "tcp", ipv6=True), b.start_server(53, "udp", ipv6=True)]  # "::" takes IPv4 too
    agent.write_catalog()
    for server in servers:
        server.wait_ready()
    for b in topo.backends:
        assert backend_live(agent, b).ip6tnl == (False, socket.IPPROTO_IPV6), "the module makes it down, ip6ip6"
        b.sysctl("net.ipv4.conf.ip6tnl0.rp_filter", 2)
    agent.apply_backends()
    for b in topo.backends:
        live = backend_live(agent, b)
        assert live.fou6_ports == {6080: "gue"} and live.fou_ports == {6080: "gue"}, "GUE over IPv6 and IPv4"
        assert live.ip6tnl == (True, socket.IPPROTO_IPV6), "ip6tnl0 up, its mode as the kernel made it"
        assert b.sysctl("net.ipv4.conf.ip6tnl0.rp_filter") == 2, "its rp_filter untouched"
        assert f"{VIP6}/128" in b.run("ip", "-6", "addr", "show", "dev", "lo").stdout

    out = agent.apply(d)
    backend6 = v6[topo.backends[0].label]
    assert f"add real server [{backend6}]:80 weight 1 via gue port 6080 in [{VIP6}]:80/tcp  ok" in out
    for b in topo.backends:
        assert (f"REJECTED service web4 instance web4-{b.label} tag 'maglev.vip={VIP4}:80': backend address "
                f"{v6[b.label]} is IPv6 and VIP {VIP4} is IPv4: the kernel's Maglev hashes only the first 32 bits") \
            in out, out
    assert VIP4 not in d.ipvsadm("-Ln"), "a refused claim builds nothing: no IPv4 service, not even an empty one"
    for key in (("-t", f"[{VIP6}]:80"), ("-u", f"[{VIP6}]:53")):
        found, listing = tunnels(d, key)
        assert set(found) == {v6[b.label] for b in topo.backends}, listing
        assert all(method == "Tunnel" and "gue" in info.lower() and "6080" in info
                   for method, info in found.values()), listing
    assert "mgl" not in d.run("ip", "-br", "link").stdout, "gue mode creates no link"
    assert d.run("ip", "route", "show", "proto", "245").stdout.strip() == "", "and no tunnel route"
    status = agent.status(d)
    refused = {(r["service"], r["instance"]) for r in status["last_pass"]["rejected"]}
    assert refused == {(s, f"{s}-{b.label}") for s in ("web4", "dns4") for b in topo.backends}, status["last_pass"]
    assert all("use an IPv6 VIP ([...]" in r["reason"] for r in status["last_pass"]["rejected"])
    assert "IPv6 underlay MTU 1500 on eth0" in (status.get("mtu_warning") or ""), status.get("mtu_warning")
    assert "raise it to 1552" in status["mtu_warning"]

    answers = {
        "tcp6": ask(client, v6[client.label], VIP6, 80, range(40000, 40024), udp=False),
        "udp6": ask(client, v6[client.label], VIP6, 53, range(41000, 41024), udp=True),
    }
    assert all(set(names) == {"b1", "b2"} for names in answers.values()), answers
    services = (("-t", f"[{VIP6}]:80"), ("-u", f"[{VIP6}]:53"))
    wait_until(lambda: all(counters(d, *key)[0] == 24 for key in services))
    for key in services:
        _, inpkts, outpkts = counters(d, *key)
        assert inpkts > 0 and outpkts == 0, f"{key}: replies go straight to the client (DSR)"


def test_the_kernel_takes_a_real_server_of_the_other_family_only_by_tunnel_and_never_beside_conn_sync(netns):
    """The kernel's own family rules (ipvsadm, no agent): an IPv6 real server of an IPv4 service (which the agent
    refuses for its hashing, not because the kernel would) and an IPv4 one of an IPv6 service by GUE tunnel, never
    by direct routing; and no such real server while a connection sync daemon runs, nor a daemon while one exists
    (the agent's conn_sync refusal)."""
    ns = netns("famd")
    ns.ip_batch(["link set lo up", "link add sync0 type dummy", "link set sync0 up multicast on",
                 "addr add 192.0.2.1/24 dev sync0", "addr add 2001:db8:1::1/64 dev sync0 nodad"])
    gue = ["-i", "--tun-type", "gue", "--tun-port", "6080"]

    def ipvsadm(*args: str) -> int:
        return ns.run("ipvsadm", *args, check=False).returncode

    assert ipvsadm("-A", "-t", f"{VIP4}:80", "-s", "mh") == 0 and ipvsadm("-A", "-t", f"[{VIP6}]:80", "-s", "mh") == 0
    assert ipvsadm("-a", "-t", f"{VIP4}:80", "-r", "[2001:db8:1::5]:80", "-g") != 0, "direct routing: same family"
    assert ipvsadm("-a", "-t", f"{VIP4}:80", "-r", "[2001:db8:1::5]:80", *gue) == 0
    assert ipvsadm("-a", "-t", f"[{VIP6}]:80", "-r", "[2001:db8:1::6]:80", *gue) == 0
    assert ipvsadm("-a", "-t", f"[{VIP6}]:80", "-r", "192.0.2.6:80", "-g") != 0
    assert ipvsadm("-a", "-t", f"[{VIP6}]:80", "-r", "192.0.2.6:80", *gue) == 0
    assert ipvsadm("--start-daemon", "master", "--mcast-interface", "sync0") != 0, "no daemon beside mixed families"
    assert ipvsadm("-C") == 0
    assert ipvsadm("--start-daemon", "master", "--mcast-interface", "sync0") == 0
    assert ipvsadm("-A", "-t", f"{VIP4}:80", "-s", "mh") == 0
    assert ipvsadm("-a", "-t", f"{VIP4}:80", "-r", "[2001:db8:1::5]:80", *gue) != 0, "no mixed family beside a daemon"
    assert ipvsadm("-a", "-t", f"{VIP4}:80", "-r", "192.0.2.5:80", *gue) == 0, "the same family is fine"
    assert ipvsadm("--stop-daemon", "master") == 0
