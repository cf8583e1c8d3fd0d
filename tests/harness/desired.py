"""The tag and desired-state tests' catalog: a director for 198.51.100.0/24 on node `backend-1` whose tunnel map
covers 192.0.2.0/25 only (an instance at 192.0.2.130 has no tunnel address), `web` instances on port 8080, and
random histories of such catalogs for the incremental books (DesiredBook, NodeBook)."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

from bridge.catalog.consul_format import snapshot_from_services
from bridge.core.config import Config, TunnelMapping
from bridge.core.desired import compute_desired
from bridge.core.model import DesiredState
from tests.catalog_builder import catalog, health_entry

CONFIG = Config(
    vip_cidrs=(ipaddress.IPv4Network("198.51.100.0/24"),),
    tunnel_map=(TunnelMapping(ipaddress.IPv4Network("192.0.2.0/25"), ipaddress.IPv4Network("203.0.113.0/25")),),
    node_name="backend-1",
)


def desired(*entries: dict[str, Any], config: Config = CONFIG) -> DesiredState:
    """The desired state of a catalog of `entries`, planned from 192.0.2.1."""
    return compute_desired(snapshot_from_services(catalog(*entries)), config, "192.0.2.1")


def web(node: str, n: int, tags: list[str], **kw: Any) -> dict[str, Any]:
    """An instance of `web` on `node` at 192.0.2.<n>:8080."""
    return health_entry("web", node, f"192.0.2.{n}", 8080, tags, **kw)


VIPS = ["198.51.100.10:80", "198.51.100.11:80", "198.51.100.10:53/udp", "198.51.100.12:443"]
BAD_TAGS = ["maglev.vip=198.51.100.300:80", "maglev.weight=x", "maglev.vip=10.0.0.1:80"]


def random_instance(rng: random.Random, service: str, n: int) -> dict[str, object]:
    """Instance `n` of `service`: up to two VIPs, sometimes a bad tag, a weight, a state, a node in or out of the
    tunnel map."""
    tags = [f"maglev.vip={v}" for v in rng.sample(VIPS, rng.randint(0, 2))]
    if rng.random() < 0.1:
        tags.append(rng.choice(BAD_TAGS))
    if rng.random() < 0.3:
        tags.append(f"maglev.weight={rng.randint(0, 5)}")
    backend = rng.choice([rng.randint(2, 12), 130])  # 192.0.2.130 lies outside the tunnel map
    return health_entry(service, f"node-{backend}", f"192.0.2.{backend}", 8080, tags,
                        status=rng.choice(["passing", "passing", "warning", "critical"]),
                        create_index=rng.randint(1, 50), instance_id=f"{service}-{n}")


def random_catalog(rng: random.Random, state: dict[str, list[dict[str, object]]]) -> None:
    """One step of a history: add, edit or remove an instance, or drop a whole service."""
    service = f"svc-{rng.randint(0, 5)}"
    entries = state.setdefault(service, [])
    roll = rng.random()
    if roll < 0.45 or not entries:
        entries.append(random_instance(rng, service, rng.randint(0, 99)))
    elif roll < 0.8:
        entries[rng.randrange(len(entries))] = random_instance(rng, service, rng.randint(0, 99))
    elif roll < 0.95:
        entries.pop(rng.randrange(len(entries)))
    else:
        state.pop(service)
    for name in [n for n, e in state.items() if not e]:
        state.pop(name)


def unique_ids(state: dict[str, list[dict[str, object]]]) -> dict[str, list[dict[str, object]]]:
    """Each service's instances with one entry per instance ID, the last: what Consul would answer."""
    out = {}
    for name, entries in state.items():
        seen: dict[str, dict[str, object]] = {}
        for entry in entries:
            seen[entry["Service"]["ID"]] = entry  # type: ignore[index]
        out[name] = list(seen.values())
    return out
