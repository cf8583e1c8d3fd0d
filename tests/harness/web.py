"""The one `web` service the planner's tests and the benchmarks drive without a kernel: VIP 198.51.100.10:80,
backend `b<n>` at 192.0.2.<n> reached through the tunnel address 203.0.113.<n>, and random histories of it."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import replace
from typing import Any

from bridge.core.config import Config, TunnelMapping
from bridge.core.encap import Forwarding
from bridge.core.keys import ServiceKey
from tests.catalog_builder import health_entry

CONFIG = Config(
    vip_cidrs=(ipaddress.IPv4Network("198.51.100.0/24"),),
    tunnel_map=(TunnelMapping(ipaddress.IPv4Network("192.0.2.0/24"), ipaddress.IPv4Network("203.0.113.0/24")),),
    drain_timeout=30,
)
"""A `fou` director (the default encapsulation) for 198.51.100.0/24."""
GUE = replace(CONFIG, encapsulation="gue")
GUE_6080 = Forwarding("tunnel", "gue", 6080, "none")
"""The forwarding of GUE's real servers with the default port and no checksum."""
VIP = "maglev.vip=198.51.100.10:80"
KEY = ServiceKey("198.51.100.10", 80, "tcp")


def entry(n: int, *, status: str = "passing", weight: int = 1, index: int | None = None,
          vip: str = VIP) -> dict[str, Any]:
    """Backend `b<n>`'s instance of `web`, created at index `n` unless told."""
    return health_entry("web", f"b{n}", f"192.0.2.{n}", 80, [vip, f"maglev.weight={weight}"], status=status,
                        create_index=index if index is not None else n)


def random_history(rng: random.Random) -> list[list[dict[str, Any]]]:
    """A catalog history over 8 backends: adds, removals, re-registrations, weight changes, flaps."""
    state: dict[int, dict[str, Any]] = {}
    index = 100
    history = []
    for _ in range(40):
        n = rng.randrange(11, 19)
        action = rng.choice(["add", "remove", "flap", "weight", "reregister"])
        if action in ("add", "reregister") or n not in state:
            index += 1
            state[n] = {"index": index, "status": "passing", "weight": rng.choice([1, 1, 2, 3])}
        elif action == "remove":
            del state[n]
        elif action == "flap":
            state[n] = {**state[n], "status": rng.choice(["passing", "critical", "warning"])}
        else:
            state[n] = {**state[n], "weight": rng.choice([0, 1, 2, 5])}
        history.append([entry(k, status=v["status"], weight=v["weight"], index=v["index"])
                        for k, v in sorted(state.items())])
    return history
