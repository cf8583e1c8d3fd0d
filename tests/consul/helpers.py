"""Registering tagged services on a real Consul the way Nomad or an operator would: through the catalog
(any node, any address) with a TTL check that the test can pass and fail."""

from __future__ import annotations

from tests.harness.consul_agent import ConsulAgent


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
