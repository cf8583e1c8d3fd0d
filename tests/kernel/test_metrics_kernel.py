"""/metrics on a real kernel: after traffic through a VIP, each real server's connection, packet and byte
counters and its active/inactive connections on /metrics are what `ipvsadm -Ln --stats` shows, and the
scrape reads the IPVS table and the agent's nftables table."""

from __future__ import annotations

import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.addresses import vip
from tests.harness.wait import wait_until
from tests.kernel.test_director import SPORTS, build

pytestmark = pytest.mark.kernel
COUNTERS = ("connections_total", "incoming_packets_total", "outgoing_packets_total", "incoming_bytes_total",
            "outgoing_bytes_total")
STATS_ROW = r"->\s+([\d.]+):\d+" + r"\s+(\d+)" * 5
"""`ipvsadm -Ln --stats --exact`: Conns InPkts OutPkts InBytes OutBytes."""
ROW = r"->\s+([\d.]+):\d+\s+Route\s+\d+\s+(\d+)\s+(\d+)"
"""`ipvsadm -Ln`: Forward Weight ActiveConn InActConn."""


def ipvsadm_rows(director, row, *args):
    out = director.run("ipvsadm", "-Ln", *args, "-t", f"{vip(1)}:80", check=False).stdout  # none before the pass
    return {m[0]: tuple(int(v) for v in m[1:]) for m in re.findall(row, out)}


def witness(director):
    """Per real server: ipvsadm's (Conns, InPkts, OutPkts, InBytes, OutBytes) and (ActiveConn, InActConn)."""
    stats = ipvsadm_rows(director, STATS_ROW, "--stats", "--exact")
    conns = ipvsadm_rows(director, ROW)
    return {address: (stats[address], conns[address]) for address in stats}


def scrape_text(director):
    with director.entered(), urllib.request.urlopen("http://127.0.0.1:9119/metrics", timeout=30) as answer:
        return answer.read().decode()


def scraped(director):
    samples = {}
    for family in text_string_to_metric_families(scrape_text(director)):
        for s in family.samples:
            if s.labels.get("local_address") == vip(1) and "remote_address" in s.labels:
                samples[(s.name.removeprefix("maglev_bridge_ipvs_backend_"), s.labels["remote_address"])] = int(s.value)
    addresses = {address for _, address in samples}
    return {a: (tuple(samples[(c, a)] for c in COUNTERS),
                (samples[("connections_active", a)], samples[("connections_inactive", a)])) for a in addresses}


def test_per_real_server_counters_on_metrics_match_ipvsadm_after_traffic(topology):
    topo, agent = build(topology)
    director = topo.directors[0]
    proc = agent.start(director)
    try:
        wait_until(lambda: len(ipvsadm_rows(director, ROW)) == 3, timeout=180, what="the agent's first pass")
        conns = topo.client.connect(vip(1), 80, sports=SPORTS)
        assert all(c.ask() == c.backend for c in conns)
        wait_until(lambda: director.ipvs_stats(vip(1), 80).conns == len(SPORTS), timeout=60, what="IPVS counters")
        seen: list[object] = []

        def agree():
            seen[:] = [witness(director), scraped(director)]
            return seen[0] == seen[1]

        wait_until(agree, timeout=120, interval=1, what="/metrics to match ipvsadm")
        by_server, _ = seen
        assert sum(stats[0] for stats, _ in by_server.values()) == len(SPORTS)
        assert all(stats[1] > 0 and stats[3] > 0 and stats[2] == 0 for stats, _ in by_server.values()), \
            "every real server got packets and bytes in; none out through the director (DSR)"
        assert sum(active for _, (active, _) in by_server.values()) == len(SPORTS), "all connections still open"
        read_ok = {s.name: s.value for f in text_string_to_metric_families(scrape_text(director)) for s in f.samples
                   if s.name.endswith("_read_ok")}
        assert read_ok == {"maglev_bridge_ipvs_read_ok": 1, "maglev_bridge_filter_read_ok": 1}, \
            "the scrape reads the agent's nftables table on its own socket too"
    finally:
        agent.stop(proc)
