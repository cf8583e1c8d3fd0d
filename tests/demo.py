"""`make demo`: the agent on the built-in example, inside the test VM.

One director, three backends and a client in network namespaces; the director runs the real long-running
agent (`maglev-bridge run`) on examples/demo-catalog.json, the backends are configured by the agent's
backend role; real TCP and UDP flows go through the VIPs, FOU tunnels and direct server return. Then a
backend goes critical in the catalog and the demo shows what the agent did and that open connections
survive. Run with: python -m tests.vm.boot -- .venv/bin/python -m tests.demo
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

from tests.harness.agent import AgentHarness
from tests.harness.netns import Bed, in_vm
from tests.harness.topology import Topology
from tests.harness.wait import wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CATALOG = ROOT / "examples" / "demo-catalog.json"
EXAMPLE_CONFIG = ROOT / "examples" / "demo-config.yaml"


def say(text: str = "") -> None:
    print(text, flush=True)


def counts(names: list[str]) -> str:
    return "  ".join(f"{name}: {n}" for name, n in sorted(Counter(names).items()))


class DemoHarness(AgentHarness):
    """The harness with the example's own configuration and catalog instead of generated ones."""

    def config_path(self, node, role):  # type: ignore[no-untyped-def]
        config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
        config.update(role=role, node_name=node.label, local_address=node.address, catalog_file=str(self.catalog_path),
                      state_file=str(self.dir / f"{node.label}-{role}-state.json"))
        path = self.dir / f"{node.label}-{role}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path


def main() -> int:
    if not in_vm():
        say("the demo needs IPVS and fou: run it with `make demo` (it boots the test VM)")
        return 2
    bed = Bed()
    try:
        return demo(Topology(bed, directors=1, backends=3, clients=1))
    finally:
        bed.teardown()


def demo(topo: Topology) -> int:
    director, client = topo.directors[0], topo.client
    agent = DemoHarness(topo)
    shutil.copy(EXAMPLE_CATALOG, agent.catalog_path)
    say(f"== built-in example: {EXAMPLE_CATALOG.relative_to(ROOT)} with {EXAMPLE_CONFIG.relative_to(ROOT)}")
    say(agent.cli(director, "director", "plan").stdout)
    topo.serve(80)
    topo.serve(53, proto="udp", backends=topo.backends[:2])

    say("== backends: maglev-bridge apply --role backend (fou receiver, tunl0, VIPs on lo, ARP/rp_filter)")
    for b in topo.backends:
        say(f"-- {b.label}")
        say(agent.cli(b, "backend", "apply", "--role", "backend").stdout)

    say("== director: maglev-bridge run (the long-running agent, watching the catalog file)")
    proc = agent.start(director)
    agent.wait_log(director, "start: applied", timeout=180)
    say(agent.log(director))

    say("== 60 TCP connections to 198.51.100.1:80 from one client, source ports 40000-40059")
    conns = client.connect("198.51.100.1", 80, sports=range(40000, 40060))
    say(f"   answered by  {counts([c.backend for c in conns])}   (weights b1:1 b2:1 b3:2)")
    wait_until(lambda: director.ipvs_stats("198.51.100.1", 80).conns >= 60)
    stats = director.ipvs_stats("198.51.100.1", 80)
    say(f"   director saw {stats.inpkts} packets in, {stats.outpkts} out: replies went straight back (DSR)")
    udp = client.udp("198.51.100.2", 53, range(41000, 41020))
    say(f"== 20 UDP flows to 198.51.100.2:53: {counts(udp)}")

    say("\n== b3 goes critical in the catalog")
    catalog = json.loads(agent.catalog_path.read_text())
    for entry in catalog["web"]:
        if entry["Node"]["Node"] == "b3":
            entry["Checks"][-1]["Status"] = "critical"
    agent.catalog_path.write_text(json.dumps(catalog))
    agent.wait_log(director, "catalog file changed: applied", timeout=180)
    after = agent.log(director).split("catalog file changed: applied", 1)[1]
    say("   the agent applied" + after.rstrip())
    on_b3 = [c for c in conns if c.backend == "b3"]
    say(f"   {sum(c.alive() for c in on_b3)} of {len(on_b3)} open connections to b3 still answer")
    fresh = client.connect("198.51.100.1", 80, sports=range(42000, 42060))
    say(f"   60 new connections: {counts([c.backend for c in fresh])}")

    say("\n== maglev-bridge explain 198.51.100.1:80/tcp 203.0.113.11:42000")
    say(agent.cli(director, "director", "explain", "198.51.100.1:80/tcp", "203.0.113.11:42000").stdout)
    say("== maglev-bridge status")
    say(agent.cli(director, "director", "status").stdout)

    code = agent.stop(proc)
    say(f"== agent stopped (exit {code}); the kernel keeps serving:")
    say(director.ipvsadm("-Ln", "--nosort"))
    alive = sum(c.alive() for c in conns + fresh)
    say(f"   {alive} of {len(conns) + len(fresh)} connections still answer with the agent stopped")
    ok = code == 0 and alive == len(conns) + len(fresh) and "b3" not in {c.backend for c in fresh}
    say("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    started = time.monotonic()
    status = main()
    print(f"(demo took {time.monotonic() - started:.0f} s inside the VM)")
    sys.exit(status)
