"""Benchmark (issue: director, section 7b), inside the test VM: a full `apply` from empty of 500 VIPs x 20
backends, timed against `ipvsadm -R` restoring the same IPVS rules in the same boot, in each encapsulation
(issue 12: `fou`, with a link and a route per backend, and `gue`, where IPVS encapsulates itself), with the
director's link count after each, and one-instance changes counted in netlink operations. Then (issue:
Consul) the running agent's passes on the same catalog against the real kernel: first full pass, full
re-sync, and the small pass after one health change.

Every namespace's IPVS rules are flushed (`ipvsadm -C`, which the kernel carries out before it answers) as soon
as its measurement is over, before the namespace is deleted: IPVS keeps the services of every namespace in one
hash table of 256 buckets, so services left in another namespace slow each lookup, and `ip netns del` alone
frees them later, in a kernel worker, during the next measurement. So each side of a comparison runs with the
same services elsewhere (the fou agent's 500 stay for the re-applies).

Run: python -m tests.vm.boot -- .venv/bin/python bench/apply_bench.py   (or `make bench`)
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# `apply` imports the agent on first use (bridge/cli/main.py); here, before the timing, which leaves interpreter
# start out for both sides
import bridge.agent.backend  # noqa: E402
import bridge.agent.director  # noqa: E402, F401
from bench.agent_passes import replay  # noqa: E402
from bridge.catalog.file import load_catalog  # noqa: E402
from bridge.cli.main import main as cli  # noqa: E402
from bridge.core.config import load_config  # noqa: E402
from bridge.core.desired import compute_desired  # noqa: E402
from tests.catalog_builder import health_entry  # noqa: E402

VIPS = int(os.environ.get("BENCH_VIPS", 500))
BACKENDS = int(os.environ.get("BENCH_BACKENDS", 20))


def netns(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "-n", name, "link", "add", "eth0", "type", "dummy"], check=True)
    subprocess.run(["ip", "-n", name, "addr", "add", "192.0.2.1/24", "dev", "eth0"], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "eth0", "up"], check=True)


def flushed(name: str) -> None:
    """The namespace's IPVS rules removed at once, then the namespace (see the module's docstring)."""
    subprocess.run(["ip", "netns", "exec", name, "ipvsadm", "-C"], check=True)
    subprocess.run(["ip", "netns", "del", name], check=True)


@contextlib.contextmanager
def entered(name: str):  # type: ignore[no-untyped-def]
    libc = __import__("ctypes").CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net", "rb") as home, open(f"/run/netns/{name}", "rb") as there:
        libc.setns(there.fileno(), 0)
        try:
            yield
        finally:
            libc.setns(home.fileno(), 0)


def catalog(status_of: dict[tuple[int, int], str] | None = None) -> dict[str, list[dict]]:
    status_of = status_of or {}
    services = {}
    for v in range(VIPS):
        name = f"svc-{v:03d}"
        services[name] = [
            health_entry(name, f"b{b:02d}", f"192.0.2.{100 + b}", 80, [f"maglev.vip=198.51.100.{v % 250 + 1}:"
                         f"{80 + v // 250}"], status=status_of.get((v, b), "passing"), create_index=1000 + v * 50 + b)
            for b in range(BACKENDS)
        ]
    return services


def apply(ns: str, config: Path, catalog_path: Path) -> tuple[float, list[str]]:
    out = io.StringIO()
    with entered(ns), contextlib.redirect_stdout(out):
        start = time.perf_counter()
        code = cli(["apply", "--config", str(config), "--catalog", str(catalog_path)])
        elapsed = time.perf_counter() - start
    if code != 0:
        raise SystemExit(out.getvalue()[-3000:])
    return elapsed, re.findall(r"^\s+\d+\. (.*?)  ok$", out.getvalue(), re.M)


def ipvsadm_rules(config: Path, catalog_path: Path) -> str:
    """The same IPVS rules as the agent's desired state, in `ipvsadm -R` form, in the same order."""
    desired = compute_desired(load_catalog(catalog_path), load_config(config), "192.0.2.1")
    fwd = desired.forwarding
    method = f"-i --tun-type gue --tun-port {fwd.port}" if fwd.method == "tunnel" else "-g"
    lines = []
    for vs in desired.virtual_services:
        lines.append(f"-A -t {vs.vip}:{vs.port} -s mh -b {','.join(vs.flags)}")
        lines.extend(f"-a -t {vs.vip}:{vs.port} -r {rs.address}:{rs.port} {method} -w {rs.weight}"
                     for rs in reversed(vs.real_servers))
    return "\n".join(lines) + "\n"


def links(ns: str) -> str:
    """The director's network interfaces besides lo and eth0, and how many of them are the agent's tunnels (the
    rest is tunl0, which the ipip module creates in every namespace)."""
    out = subprocess.run(["ip", "-n", ns, "-br", "link"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0].split("@")[0] for line in out.splitlines()]
    others = [name for name in names if name not in ("lo", "eth0")]
    return f"{len(others)} ({sum(1 for name in others if name.startswith('mgl'))} of them the agent's tunnels)"


def full_apply(work: Path, mode: str, catalog_path: Path) -> tuple[Path, float]:
    """A full apply from empty in `mode` against `ipvsadm -R` of the same rules, each in a fresh namespace."""
    config = work / f"config-{mode}.yaml"
    config.write_text("vip_cidrs: [198.51.100.0/24]\n"
                      "tunnel_map: [{backend: 192.0.2.96/27, tunnel: 203.0.113.96/27}]\n"
                      f"encapsulation: {mode}\n"
                      f"local_address: 192.0.2.1\nstate_file: {work}/state-{mode}.json\ndrain_timeout: 0\n")
    agent_ns, tool_ns = f"bench-agent-{mode}", f"bench-ipvsadm-{mode}"
    netns(agent_ns)
    netns(tool_ns)
    rules = ipvsadm_rules(config, catalog_path)
    start = time.perf_counter()
    subprocess.run(["ip", "netns", "exec", tool_ns, "ipvsadm", "-R"], input=rules, text=True, check=True)
    c_tool = time.perf_counter() - start
    flushed(tool_ns)
    full, ops = apply(agent_ns, config, catalog_path)
    ipvs_ops = sum(1 for op in ops if "service" in op or "real server" in op)
    print(f"{mode}: full apply from empty: {VIPS} VIPs x {BACKENDS} backends = {len(ops)} netlink operations "
          f"({ipvs_ops} IPVS, {len(ops) - ipvs_ops} links, routes and sysctls); director links after: "
          f"{links(agent_ns)}")
    print(f"  maglev-bridge apply (in-process, without interpreter start): {full:7.2f} s")
    print(f"  ipvsadm -R of the same {ipvs_ops} IPVS rules:                  {c_tool:7.2f} s")
    print(f"  ratio {full / c_tool:.2f}x (goal: within 2x of the C tool)")
    return config, full


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="apply-bench-"))
    catalog_path = work / "catalog.json"
    services = catalog()
    catalog_path.write_text(json.dumps(services))
    config, fou = full_apply(work, "fou", catalog_path)
    _, gue = full_apply(work, "gue", catalog_path)
    print(f"gue apply / fou apply: {gue / fou:.2f}x")
    flushed("bench-agent-gue")
    noop, ops = apply("bench-agent-fou", config, catalog_path)
    print(f"re-apply unchanged: {len(ops)} operations, {noop:.2f} s (reading {VIPS} services back)")
    for label, change in (("one instance critical", {(7, 3): "critical"}), ("and back", {})):
        catalog_path.write_text(json.dumps(catalog(change)))
        elapsed, ops = apply("bench-agent-fou", config, catalog_path)
        print(f"{label}: {len(ops)} netlink operation(s) {ops} in {elapsed:.2f} s")
    flushed("bench-agent-fou")
    agent_passes(config, services)


def agent_passes(config_path: Path, services: dict[str, list[dict]]) -> None:
    """The running agent's passes (Agent.sync) on this catalog: against the real kernel in a fresh namespace,
    and in shadow mode (same code, a model instead of netlink) to tell kernel time from Python time."""
    base = load_config(config_path)
    rows = {}
    for mode in ("kernel", "shadow"):
        ns = f"bench-run-{mode}"
        netns(ns)
        with entered(ns):
            config = replace(base, dataplane=mode, state_file=f"{base.state_file}.{mode}")
            rows[mode], _ = replay(config, copy.deepcopy(services))
        flushed(ns)
    print(f"agent passes (Agent.sync, in-process), {VIPS} VIPs x {BACKENDS} backends, median ms:"
          f"{'real kernel':>14}{'shadow':>10}")
    for label in rows["kernel"]:
        print(f"  {label:<44}{rows['kernel'][label]:14.1f}{rows['shadow'][label]:10.1f}")


if __name__ == "__main__":
    main()
