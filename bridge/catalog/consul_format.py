"""Consul's health-endpoint format turned into plain `Instance` values.

Both the file source and the live Consul source hand their data through here, so a file written from
`GET /v1/health/service/<name>` and the agent watching Consul see exactly the same snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from bridge.model import Health, Instance, Snapshot

_SEVERITY: dict[str, int] = {"passing": 0, "warning": 1, "critical": 2, "maintenance": 2}
_BY_SEVERITY: dict[int, Health] = {0: "passing", 1: "warning", 2: "critical"}


class CatalogFormatError(ValueError):
    """The catalog data is not in Consul's health format; names the service and the field."""


def fold_health(checks: Iterable[Mapping[str, Any]]) -> Health:
    """The worst of an instance's own checks and its node's checks (serfHealth among them)."""
    worst = 0
    for check in checks:
        status = str(check.get("Status", "critical"))
        worst = max(worst, _SEVERITY.get(status, 2))
    return _BY_SEVERITY[worst]


def _field(service: str, entry: Mapping[str, Any], *path: str) -> Any:
    value: Any = entry
    for part in path:
        if not isinstance(value, Mapping) or part not in value:
            raise CatalogFormatError(f"service {service!r}: entry lacks {'.'.join(path)}")
        value = value[part]
    return value


def instance_from_entry(service: str, entry: Mapping[str, Any]) -> Instance:
    svc = _field(service, entry, "Service")
    node = _field(service, entry, "Node")
    address = svc.get("Address") or node.get("Address")
    if not address:
        raise CatalogFormatError(f"service {service!r}: instance {svc.get('ID')!r} has no address")
    return Instance(
        service=str(svc.get("Service") or service),
        instance_id=str(svc.get("ID") or svc.get("Service") or service),
        node=str(node.get("Node", "")),
        address=str(address),
        port=int(svc.get("Port") or 0),
        tags=tuple(str(t) for t in (svc.get("Tags") or ())),
        health=fold_health(entry.get("Checks") or ()),
        create_index=int(svc.get("CreateIndex") or 0),
    )


def _order(instance: Instance) -> tuple[str, str, str]:
    return (instance.service, instance.node, instance.instance_id)


def instances_of(name: str, entries: Iterable[Mapping[str, Any]]) -> tuple[Instance, ...]:
    """One service's instances in the canonical order; a snapshot is these, service by service in name order."""
    return tuple(sorted((instance_from_entry(name, entry) for entry in entries), key=_order))


def snapshot_from_services(services: Mapping[str, Iterable[Mapping[str, Any]]]) -> Snapshot:
    """Build a snapshot in a canonical order, whatever order the source listed things in."""
    instances = [instance_from_entry(name, entry) for name, entries in services.items() for entry in entries]
    instances.sort(key=_order)
    return Snapshot(tuple(instances))
