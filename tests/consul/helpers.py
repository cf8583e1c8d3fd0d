"""Registering tagged services on a real Consul the way Nomad or an operator would: through the catalog
(any node, any address) with a TTL check that the test can pass and fail."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.real.consul_agent import ConsulAgent


def register(consul: ConsulAgent, service: str, node: str, address: str, port: int, tags: list[str],
             status: str = "passing") -> str:
    sid = f"{service}-{node}"
    consul.api("/v1/catalog/register", method="PUT", body={
        "Node": node, "Address": address,
        "Service": {"ID": sid, "Service": service, "Address": address, "Port": port, "Tags": tags},
        "Check": {"CheckID": f"service:{sid}", "Name": "ttl", "Status": status, "ServiceID": sid},
    })
    return sid


def set_health(consul: ConsulAgent, service: str, node: str, address: str, status: str) -> None:
    sid = f"{service}-{node}"
    consul.api("/v1/catalog/register", method="PUT", body={
        "Node": node, "Address": address,
        "Check": {"CheckID": f"service:{sid}", "Name": "ttl", "Status": status, "ServiceID": sid},
        "SkipNodeUpdate": True,
    })


def deregister(consul: ConsulAgent, service: str, node: str) -> None:
    consul.api("/v1/catalog/deregister", method="PUT", body={"Node": node, "ServiceID": f"{service}-{node}"})


def eventually(check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1) -> Any:
    """Poll until check() is truthy (exceptions count as not yet) and return its value. The deadline only
    bounds a failure: real Consul and Nomad on a loaded 2-core machine, or inside the emulated VM, take many
    times longer than on an idle one, and a pass costs no more for a generous deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s; last: {last!r}")
