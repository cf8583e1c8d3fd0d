"""The director's source allow lists on a real kernel: the agent's own nftables table beside an operator's
table and iptables-nft rules, through `maglev-bridge apply` and `run`. Witnesses: the clients' sockets,
`nft list table` and the IPVS connection counters."""

from __future__ import annotations

import re
import socket
import struct

import pytest

from tests.harness.addresses import vip
from tests.harness.agent import AgentHarness
from tests.harness.wait import wait_until

pytestmark = pytest.mark.kernel
OPERATOR_TABLE = """table inet operator {
    chain input {
        type filter hook input priority filter; policy accept;
        tcp dport 2222 drop
        tcp dport 22 accept
    }
}
"""
WEB = f"maglev.vip={vip(1)}:80"
OPEN = f"maglev.vip={vip(2)}:80"


def operators(director) -> str:
    """The operator's table and iptables-nft's `ip filter` table, as nft lists them."""
    return (director.run("nft", "list", "table", "inet", "operator").stdout
            + director.run("nft", "list", "table", "ip", "filter").stdout)


def ours(director) -> str:
    return director.run("nft", "-a", "list", "table", "inet", "maglev_bridge").stdout


def refused(client, address: str) -> str:
    """How a connection attempt to address:80 ends: 'timeout' (no answer: the SYN was dropped), 'reset' or
    'answered'."""
    s = client.socket()
    s.settimeout(6)
    try:
        s.connect((address, 80))
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "reset"
    finally:
        s.close()
    return "answered"


def drops(agent, director, address: str) -> int:
    entries = agent.status(director)["filter"]["allows"]
    return next(e["drops"] for e in entries if e["vip"] == address)


def filter_steps(output: str) -> list[str]:
    return [line.split(". ", 1)[1] for line in output.splitlines()
            if ". filter " in line or ". create nftables" in line]


def icmp_socket(client, body: bytes, address: str) -> socket.socket:
    """A raw ICMP socket in the client's namespace (the VM has no ping) that has sent `body` (an ICMP message
    with a zero checksum, of even length) to address, its checksum filled in."""
    total = sum(struct.unpack(f"!{len(body) // 2}H", body))
    total = (total >> 16) + (total & 0xFFFF)
    packet = body[:2] + struct.pack("!H", ~(total + (total >> 16)) & 0xFFFF) + body[4:]
    with client.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.sendto(packet, (address, 0))
    return s


def echo_answered(client, address: str) -> bool:
    """An ICMP echo request from the client to address is answered."""
    with icmp_socket(client, struct.pack("!BBHHH", 8, 0, 0, 0x4D47, 1) + b"maglev", address) as s:
        s.settimeout(10)
        while True:
            data, (source, _) = s.recvfrom(1500)
            header = (data[0] & 0x0F) * 4
            if source == address and data[header] == 0:
                return True


def test_allow_lists_filter_only_what_the_catalog_forbids_and_leave_operators_rules_alone(topology):
    topo = topology(directors=1, backends=2, clients=2)
    d, (allowed, outsider) = topo.directors[0], topo.clients
    d.run("nft", "-f", "-", input=OPERATOR_TABLE)
    d.run("iptables", "-A", "INPUT", "-p", "tcp", "--dport", "2323", "-j", "DROP")
    d.run("iptables", "-A", "INPUT", "-p", "tcp", "--dport", "23", "-j", "ACCEPT")
    before = operators(d)
    agent = AgentHarness(topo)
    for b in topo.backends:
        agent.instance("web", b, tags=[WEB, f"maglev.allow={allowed.address}/32"])
        agent.instance("open", b, tags=[OPEN], index=200 + b.index)
    topo.serve(80)
    agent.apply_backends()

    first = agent.apply(d)
    assert filter_steps(first) == [
        "create nftables table inet maglev_bridge, chain input (hook input priority filter)  ok",
        f"filter {vip(1)}:80/tcp: allow only {allowed.address}/32  ok"]
    assert allowed.connect(vip(1), 80, n=1)[0].backend in ("b1", "b2")
    assert refused(outsider, vip(1)) == "timeout", "the SYN is dropped, not reset"
    wait_until(lambda: drops(agent, d, vip(1)) > 0, timeout=60, what="the service's drop counter moved")
    assert outsider.connect(vip(2), 80, n=1)[0].backend in ("b1", "b2"), "a service without a list is open"
    assert echo_answered(outsider, vip(1)), "ICMP to a VIP is never filtered"
    assert operators(d) == before

    table = ours(d)
    assert "nothing to change" in agent.apply(d), "an unchanged catalog sends no transaction"
    assert ours(d) == table and operators(d) == before

    agent.instance("web", topo.backends[0], tags=[WEB, f"maglev.allow={outsider.address}/32"])
    changed = agent.apply(d)
    assert filter_steps(changed) == [
        f"filter {vip(1)}:80/tcp: allow list +{outsider.address}/32 -{allowed.address}/32  ok"]
    assert changed.count("  ok") == 1, f"one change, one small transaction:\n{changed}"
    after = ours(d)
    assert [line for line in after.splitlines() if "elements" not in line] == [
        line for line in table.splitlines() if "elements" not in line], "only the set's elements changed"
    assert outsider.connect(vip(1), 80, n=1) and refused(allowed, vip(1)) == "timeout"

    agent.instance("web", topo.backends[1], tags=[WEB, "maglev.allow=10.0.0.1/8"])
    malformed = agent.apply(d)
    assert "REJECTED service web instance web-b2 tag 'maglev.allow=10.0.0.1/8'" in malformed
    assert filter_steps(malformed) == [] and refused(allowed, vip(1)) == "timeout"
    assert outsider.connect(vip(1), 80, n=1)[0].backend == "b1", "the rest of the catalog is served as before"

    wait_until(lambda: "nothing to change" in agent.apply(d), timeout=60, what="the rejected instance drained")
    restarted = ours(d)
    for _ in range(2):
        since = len(agent.log(d))
        proc = agent.start(d)
        agent.wait_log(d, "start: nothing to change", timeout=240, since=since)
        assert agent.stop(proc) == 0
        assert ours(d) == restarted and operators(d) == before, "a restart leaves both tables as they were"

    for service in ("web", "open"):
        for b in topo.backends:
            agent.remove(service, b)
    agent.apply(d)
    assert f"maglev-bridge {vip(1)}:80/tcp" in ours(d), "the list stays while the service drains"
    wait_until(lambda: "filter" in agent.apply(d), timeout=60, what="the drained service and its list removed")
    assert "maglev_bridge" in d.run("nft", "list", "tables").stdout, "the table itself is never deleted"
    assert "@allow_" not in ours(d) and operators(d) == before


def test_a_refused_transaction_changes_nothing_and_the_pass_reports_it(topology):
    topo = topology(directors=1, backends=1, clients=1)
    d, b = topo.directors[0], topo.backends[0]
    agent = AgentHarness(topo)
    agent.instance("web", b, tags=[WEB, "maglev.allow=192.0.2.0/24"])
    agent.apply(d)
    # Someone's rule in our chain uses web's set: deleting the set fails, and with it the whole transaction.
    d.run("nft", "add", "rule", "inet", "maglev_bridge", "input", "ip", "saddr", "@allow_c6336401_tcp_80", "accept")
    table = ours(d)
    agent.instance("web", b, tags=[WEB])
    agent.instance("open", b, tags=[OPEN, "maglev.allow=192.0.2.0/25"])
    out = agent.apply(d, check=False)
    assert f"filter {vip(2)}:80/tcp: allow only 192.0.2.0/25  FAILED" in out
    assert f"filter {vip(1)}:80/tcp: remove (every source allowed)  FAILED" in out
    assert ours(d) == table, "nothing of the refused transaction took effect"


def test_the_filter_chain_runs_before_ipvs(topology):
    """A dropped SYN never reaches IPVS (its LOCAL_IN hooks sit at priorities 98 and 99, ours at 0): the
    service's connection counter stays at 0."""
    topo = topology(directors=1, backends=1, clients=1)
    d = topo.directors[0]
    agent = AgentHarness(topo)
    agent.instance("web", topo.backends[0], tags=[WEB, "maglev.allow=192.0.2.0/24"])
    topo.serve(80)
    agent.apply_backends()
    agent.apply(d)
    assert refused(topo.client, vip(1)) == "timeout"
    wait_until(lambda: drops(agent, d, vip(1)) > 0, timeout=60, what="the drop counted")
    assert d.ipvs_stats(vip(1), 80).conns == 0


def test_the_agent_writes_the_table_element_for_element_as_nft_would(netns):
    """The transaction is nf_tables netlink written by the agent (bridge/dataplane/nft_netlink.py), not
    libnftables: the kernel must hold what `nft -f` of the table's own listing holds, expressions, element
    flags and comments included (`nft --debug=netlink list` prints the kernel's objects; only the rule
    handles, which number objects in creation order, may differ)."""
    from bridge.core.keys import ServiceKey
    from bridge.core.ops import AddAllow, ChangeAllow, CreateFilter
    from bridge.dataplane.nft import Nft

    ns = netns("nft")
    web, dns = ServiceKey(vip(1), 80, "tcp"), ServiceKey(vip(2), 53, "udp")
    with ns.entered():
        nft = Nft()
        try:
            handles = nft.transaction([CreateFilter(), AddAllow(web, ("10.0.0.0/8", "192.0.2.7/32")),
                                       AddAllow(dns, ("0.0.0.0/8", "203.0.113.0/24", "240.0.0.0/4"))])
            assert nft.read().allows[0].rule == handles[web], "the echoed handle is the rule's"

            def netlink() -> str:
                listing = ns.run("nft", "--debug=netlink", "list", "table", "inet", "maglev_bridge").stdout
                return re.sub(r"(?m)^(inet maglev_bridge input) \d+( \d+)?$", r"\1", listing)

            written = netlink()
            text = ns.run("nft", "list", "table", "inet", "maglev_bridge").stdout
            ns.run("nft", "delete", "table", "inet", "maglev_bridge")
            ns.run("nft", "-f", "-", input=text)
            assert netlink() == written
            assert "203.0.113.0/24" in text and "240.0.0.0/4" in text and "192.0.2.7" in text

            nft.transaction([ChangeAllow(web, ("0.0.0.0/0",), ("10.0.0.0/8", "192.0.2.7/32"))])
            assert [e.prefixes for e in nft.read().allows] == [("0.0.0.0/0",), ("0.0.0.0/8", "203.0.113.0/24",
                                                                                  "240.0.0.0/4")]
        finally:
            nft.close()


def test_fragmentation_needed_from_a_refused_source_passes_the_filter(topology):
    """Path MTU discovery through the encapsulation needs ICMP fragmentation-needed to reach the VIP from
    any router or client, listed or not. The agent's rules match `tcp dport`/`udp dport` only; the witness
    is an operator's counter in a chain after ours (priority 10) that sees the message arrive."""
    topo = topology(directors=1, backends=1, clients=1)
    d, outsider = topo.directors[0], topo.client
    agent = AgentHarness(topo)
    agent.instance("web", topo.backends[0], tags=[WEB, "maglev.allow=192.0.2.0/24"])
    agent.apply(d)
    d.run("nft", "-f", "-", input="""table inet witness {
    chain input {
        type filter hook input priority 10; policy accept;
        icmp type destination-unreachable icmp code frag-needed counter
    }
}
""")
    # The message quotes the VIP's TCP segment to the client that was too big for the path (MTU 1400).
    quoted = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1500, 1, 0, 64, socket.IPPROTO_TCP, 0,
                         socket.inet_aton(vip(1)), socket.inet_aton(outsider.address)) + struct.pack("!HHI", 80,
                                                                                                        40000, 1)
    icmp_socket(outsider, struct.pack("!BBHHH", 3, 4, 0, 0, 1400) + quoted, vip(1)).close()

    def witnessed() -> bool:
        return "counter packets 0 " not in d.run("nft", "list", "table", "inet", "witness").stdout

    wait_until(witnessed, timeout=60, what="the operator's chain after ours saw the fragmentation-needed")
    assert drops(agent, d, vip(1)) == 0


def test_a_running_agent_keeps_its_copy_of_the_table_as_a_listing_would_show_it(netns):
    """Between full passes the agent does not list the table (2,000 sets cost 0.5-3 s): its copy moves by
    each transaction that took effect, with the rule handles the kernel echoed. That copy must be what a
    listing says, and a removal later sent with a handle from it must work."""
    from dataclasses import replace

    from bridge.core.keys import ServiceKey
    from bridge.core.ops import AddAllow, ChangeAllow, CreateFilter, DelAllow
    from bridge.dataplane.kernel import Kernel
    from bridge.dataplane.view import KernelView
    from tests.harness.web import CONFIG

    ns = netns("view")
    web, dns = ServiceKey(vip(1), 80, "tcp"), ServiceKey(vip(2), 53, "udp")
    with ns.entered():
        kernel = Kernel(replace(CONFIG, role="director"))
        try:
            view = KernelView(kernel)
            view.read(None)

            def kept():
                return view.read(frozenset()).filter

            def listed():
                table = kernel.read_filter()
                return replace(table, allows=tuple(replace(e, drops=0) for e in table.allows))

            for ops in ([CreateFilter(), AddAllow(web, ("192.0.2.0/24",))],
                        [AddAllow(dns, ("10.0.0.0/8",)), ChangeAllow(web, ("203.0.113.0/24",), ("192.0.2.0/24",))]):
                assert [r.error for r in view.apply(ops)] == [None] * len(ops)
                assert kept() == listed()
            rule = next(e.rule for e in kept().allows if e.key == dns)
            assert [r.error for r in view.apply([DelAllow(dns, rule, True, True)])] == [None]
            assert kept() == listed() and [e.key for e in listed().allows] == [web]
        finally:
            kernel.close()
