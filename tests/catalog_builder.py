"""Builds catalogs in Consul's `GET /v1/health/service/<name>` format for tests, the demo and benchmarks."""

from __future__ import annotations

from typing import Any


def health_entry(
    service: str,
    node: str,
    address: str,
    port: int,
    tags: list[str],
    *,
    status: str = "passing",
    create_index: int = 10,
    instance_id: str | None = None,
    node_status: str = "passing",
) -> dict[str, Any]:
    sid = instance_id or f"{service}-{node}"
    return {
        "Node": {"ID": "", "Node": node, "Address": address, "Datacenter": "dc1", "Meta": {}},
        "Service": {
            "ID": sid, "Service": service, "Tags": tags, "Address": address, "Port": port, "Meta": {},
            "CreateIndex": create_index, "ModifyIndex": create_index,
        },
        "Checks": [
            {"Node": node, "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": node_status,
             "ServiceID": "", "ServiceName": ""},
            {"Node": node, "CheckID": f"service:{sid}", "Name": f"Service '{service}' check", "Status": status,
             "ServiceID": sid, "ServiceName": service},
        ],
    }


def catalog(*entries: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        out.setdefault(entry["Service"]["Service"], []).append(entry)
    return out
