"""The boundary bad catalog data cannot cross: Consul's health-endpoint format turned into plain `Instance`
values, or into a `Rejection` per entry that does not fit.

Both the file source and the live Consul source hand their data through here, so a file written from
`GET /v1/health/service/<name>` and the agent watching Consul see exactly the same snapshot.

The schema is msgspec's: it decodes the JSON straight into typed structs (ignoring the fields the agent
does not read), strictly (no `"80"` for 80, no `true` for 1, no 80.0), with ranges checked. Measured with
`bench/plan_bench.py`, this makes `plan` faster than `json.loads` and hand-checked dicts did. A document
where every entry fits is decoded in one call; only when one does not is the document decoded again loosely
and each entry converted alone, so one bad entry is rejected with its field and the rest go on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Annotated, Any

import msgspec

from bridge.core.model import Health, Instance, Rejection, Snapshot

_SEVERITY: dict[str, int] = {"passing": 0, "warning": 1, "critical": 2, "maintenance": 2}
_BY_SEVERITY: dict[int, Health] = {0: "passing", 1: "warning", 2: "critical"}
WHOLE_SERVICE = "*"
"""The instance named by a rejection of a service's whole answer (it was not an array of entries)."""

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
RaftIndex = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
"""Consul's indexes are uint64; msgspec bounds stop at int64, far beyond any real index."""


class CatalogFormatError(ValueError):
    """The catalog as a whole is unusable (not JSON, not an object of arrays): names the file or service."""


class NodeEntry(msgspec.Struct):
    Node: str
    Address: str = ""


class ServiceEntry(msgspec.Struct):
    ID: str = ""
    Service: str = ""
    Tags: list[str] | None = None
    """Go encodes an empty slice as null."""
    Address: str = ""
    Port: Port = 0
    CreateIndex: RaftIndex = 0


class CheckEntry(msgspec.Struct):
    Status: str = "critical"


class HealthEntry(msgspec.Struct):
    Node: NodeEntry
    Service: ServiceEntry
    Checks: list[CheckEntry] | None = None


class CheckState(msgspec.Struct, frozen=True):
    """One entry of `GET /v1/health/state/any`: which check of which node and service, and when it last
    changed. A node's own checks (serfHealth among them) have no ServiceName."""

    Node: str
    CheckID: str
    Status: str = ""
    ServiceName: str = ""
    ModifyIndex: RaftIndex = 0


_SERVICE_DECODER = msgspec.json.Decoder(list[HealthEntry])
_CHECKS_DECODER = msgspec.json.Decoder(list[CheckState])
_CATALOG_DECODER = msgspec.json.Decoder(dict[str, list[HealthEntry]])
_LOOSE_DECODER = msgspec.json.Decoder()


def fold_health(checks: Iterable[CheckEntry]) -> Health:
    """The worst of an instance's own checks and its node's checks (serfHealth among them); a status the
    agent does not know counts as critical."""
    worst = 0
    for check in checks:
        worst = max(worst, _SEVERITY.get(check.Status, 2))
    return _BY_SEVERITY[worst]


def _instance(service: str, entry: HealthEntry) -> Instance | Rejection:
    svc, node = entry.Service, entry.Node
    ident = svc.ID or svc.Service or service
    if svc.Service and svc.Service != service:
        return Rejection(service, ident, "", f"field Service.Service: expected {service!r} (the service this "
                                             f"entry is listed under), got {svc.Service!r}")
    address = svc.Address or node.Address
    if not address:
        return Rejection(service, ident, "", "field Service.Address: expected an address here or in Node.Address")
    return Instance(service, ident, node.Node, address, svc.Port, tuple(svc.Tags) if svc.Tags else (),
                    fold_health(entry.Checks or ()), svc.CreateIndex)


def _instance_name(item: Any, position: int) -> str:
    """The ID of an entry that did not fit, when it has a usable one; else its position in the answer."""
    service = item.get("Service") if isinstance(item, dict) else None
    ident = service.get("ID") if isinstance(service, dict) else None
    return ident if isinstance(ident, str) and ident else f"#{position}"


def _reason(exc: msgspec.ValidationError) -> str:
    """msgspec's 'Expected `int`, got `str` - at `$.Service.Port`' as 'field Service.Port: expected ...'. It
    never quotes the offending value, so nothing hostile is echoed."""
    message, _, path = str(exc).partition(" - at `")
    where = path.rstrip("`").removeprefix("$").removeprefix(".")
    return f"field {where or 'entry'}: {message[:1].lower()}{message[1:]}"


def _checked(service: str, items: Any) -> Iterator[HealthEntry | Rejection]:
    """One service's loosely decoded answer, entry by entry: the slow path, taken only when something is wrong."""
    if not isinstance(items, list):
        yield Rejection(service, WHOLE_SERVICE, "", f"expected an array of health entries, got {type(items).__name__}")
        return
    for position, item in enumerate(items):
        try:
            yield msgspec.convert(item, HealthEntry, strict=True)
        except msgspec.ValidationError as exc:
            yield Rejection(service, _instance_name(item, position), "", _reason(exc))


def _snapshot(services: Iterable[tuple[str, Iterable[HealthEntry | Rejection]]]) -> Snapshot:
    """Instances in the canonical order (by service, node, instance id), whatever order the source used."""
    instances: list[Instance] = []
    rejected: list[Rejection] = []
    for service, entries in services:
        for entry in entries:
            found = entry if isinstance(entry, Rejection) else _instance(service, entry)
            if isinstance(found, Rejection):
                rejected.append(found)
            else:
                instances.append(found)
    instances.sort(key=_order)
    return Snapshot(tuple(instances), rejected=tuple(rejected))


def _order(instance: Instance) -> tuple[str, str, str]:
    return (instance.service, instance.node, instance.instance_id)


def _loose(data: bytes | str, what: str) -> Any:
    try:
        return _LOOSE_DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise CatalogFormatError(f"{what} is not valid JSON: {exc}") from None


def parse_service(name: str, data: bytes | str) -> Snapshot:
    """One service's `GET /v1/health/service/<name>` answer: its instances and its rejected entries.
    CatalogFormatError only when the answer is not JSON at all."""
    try:
        return _snapshot([(name, _SERVICE_DECODER.decode(data))])
    except msgspec.ValidationError:
        return _snapshot([(name, _checked(name, _loose(data, f"service {name!r}")))])
    except msgspec.DecodeError as exc:
        raise CatalogFormatError(f"service {name!r}: the answer is not valid JSON: {exc}") from None


def parse_catalog(data: bytes | str, what: str = "catalog") -> Snapshot:
    """A JSON object of service name -> health entries (the file source's format). CatalogFormatError only
    when the document as a whole is not that; a bad service or entry is rejected alone."""
    try:
        return _snapshot(_CATALOG_DECODER.decode(data).items())
    except msgspec.ValidationError:
        raw = _loose(data, what)
    except msgspec.DecodeError as exc:
        raise CatalogFormatError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CatalogFormatError(f"{what}: expected a JSON object of service name -> array of health entries, "
                                 f"got {type(raw).__name__}")
    return _snapshot((name, _checked(name, items)) for name, items in raw.items())


def snapshot_from_services(services: Mapping[str, Iterable[Mapping[str, Any]]]) -> Snapshot:
    """A snapshot of already decoded JSON (tests and the demo build catalogs as Python data), through the
    same boundary as a file."""
    return parse_catalog(msgspec.json.encode(services))


def parse_checks(data: bytes | str) -> dict[tuple[str, str], CheckState]:
    """A `GET /v1/health/state/<state>` answer, by (node, check id). CatalogFormatError when it does not fit:
    the change feed it comes from is only a hint, so nothing is rejected one by one."""
    try:
        return {(check.Node, check.CheckID): check for check in _CHECKS_DECODER.decode(data)}
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise CatalogFormatError(f"the list of failing checks does not fit: {exc}") from None


class NodeCheck(msgspec.Struct):
    """One entry of `GET /v1/health/node/<node>`: a node's own check has no ServiceID."""

    Status: str = "critical"
    ServiceID: str = ""


class NodeServices(msgspec.Struct):
    """`GET /v1/catalog/node-services/<node>`; Consul 1.16.3 answers `{"Node": null, "Services": null}` for a
    node it does not know (older versions `null`)."""

    Node: NodeEntry | None = None
    Services: list[Any] | None = None


_NODE_SERVICES_DECODER = msgspec.json.Decoder(NodeServices | None)
_NODE_CHECKS_DECODER = msgspec.json.Decoder(list[NodeCheck])


def carries_tag(tags: Any, vip_tag: str) -> bool:
    """Whatever shape a service's tag list has: anything but a list of strings is no tag of ours."""
    return isinstance(tags, list) and any(
        isinstance(t, str) and (t == vip_tag or t.startswith(vip_tag + "=")) for t in tags)


def parse_node(services: bytes | str, checks: bytes | str, vip_tag: str) -> Snapshot | None:
    """One node's tagged instances from its service list and its checks, joined into the same health
    entries `parse_service` reads (each instance's own checks plus the node's), so the backend role sees
    the very `Instance` values the director does. Each service entry is converted alone: a bad one is
    rejected with its field and the others go on. None when Consul does not know the node (a node whose last
    service left stays listed while its agent runs). CatalogFormatError when either answer as a whole does
    not fit."""
    try:
        listed = _NODE_SERVICES_DECODER.decode(services)
        found = _NODE_CHECKS_DECODER.decode(checks)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise CatalogFormatError(f"the node's services or checks do not fit: {exc}") from None
    if listed is None or listed.Node is None:
        return None
    by_service: dict[str, list[CheckEntry]] = {}
    for check in found:
        by_service.setdefault(check.ServiceID, []).append(CheckEntry(check.Status))
    node_checks = by_service.get("", [])
    grouped: dict[str, list[HealthEntry | Rejection]] = {}
    for position, item in enumerate(listed.Services or ()):
        if not isinstance(item, dict) or not carries_tag(item.get("Tags"), vip_tag):
            continue
        name = item.get("Service")
        service = name if isinstance(name, str) and name else WHOLE_SERVICE
        try:
            entry = msgspec.convert(item, ServiceEntry, strict=True)
        except msgspec.ValidationError as exc:
            grouped.setdefault(service, []).append(
                Rejection(service, _instance_name({"Service": item}, position), "", _reason(exc).replace(
                    "field ", "field Service.", 1)))
            continue
        grouped.setdefault(service, []).append(
            HealthEntry(listed.Node, entry, [*by_service.get(entry.ID, ()), *node_checks]))
    return _snapshot(grouped.items())
