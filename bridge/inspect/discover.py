"""`status --discover`: every director of a data centre, found through Consul DNS (SRV records of the
agents' service), each one's /status in one table, and a flag wherever directors disagree about a VIP's
Maglev table: a flow would reach different backends depending on which director the router picks.

Each answer is decoded into `StatusReport`, the part of /status this table reads, typed: another director's
answer is data from the network (maybe from another version of the agent), so a field of the wrong type is
named with its path ("Expected `int`, got `str` - at `$.virtual_services[0].port`") and that director shows
as unreadable, instead of a KeyError ending the command. Fields this table does not read are ignored, so
directors of newer versions with more to say are still shown."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import msgspec

from bridge.core.config import Config, ConfigError
from bridge.core.keys import Protocol, ServiceKey
from bridge.inspect.text import maintenance_text


class ReportedService(msgspec.Struct, frozen=True):
    vip: str
    port: int
    protocol: Protocol
    fingerprint: str | None = None
    real_servers: tuple[dict[str, Any], ...] = ()

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(self.vip, self.port, self.protocol)


class ReportedAgent(msgspec.Struct, frozen=True):
    role: str = "?"
    version: str = "?"
    ready: bool = False
    degraded: bool = False
    maintenance: dict[str, Any] | None = None


class StatusReport(msgspec.Struct, frozen=True):
    """What `status --discover` reads of a director's /status (`bridge.agent.http`)."""

    agent: ReportedAgent = ReportedAgent()
    virtual_services: tuple[ReportedService, ...] = ()
    encapsulation: str | None = None
    """fou or gue; None from agents before encapsulations existed (they are fou) and from backends."""


def read_report(body: bytes | str) -> StatusReport:
    """A /status answer; msgspec's error (naming the field's path) when it is not one."""
    return msgspec.json.decode(body, type=StatusReport)


@dataclass(frozen=True)
class Director:
    address: str
    port: int
    status: StatusReport | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass
class Discovery:
    directors: list[Director] = field(default_factory=list)
    fingerprints: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    """VIP -> director label -> fingerprint."""

    @property
    def disagreeing(self) -> list[str]:
        return sorted(vip for vip, prints in self.fingerprints.items() if len(set(prints.values())) > 1)

    @property
    def encapsulations(self) -> dict[str, list[str]]:
        """Encapsulation -> the directors using it (an agent that does not report one is fou)."""
        found: dict[str, list[str]] = defaultdict(list)
        for d in self.directors:
            if d.status is not None and d.status.agent.role == "director":
                found[d.status.encapsulation or "fou"].append(d.label)
        return dict(found)


def mixed_text(encapsulations: dict[str, list[str]]) -> str | None:
    """The flag of a fleet whose directors use different encapsulations: their real servers have different
    addresses (tunnel addresses in fou, backend addresses in gue), so their Maglev tables differ by design and
    a flow moved between two of them (maintenance, a failure, ECMP rehashing) reaches another backend."""
    if len(encapsulations) < 2:
        return None
    groups = "; ".join(f"{kind}: {', '.join(sorted(labels))}" for kind, labels in sorted(encapsulations.items()))
    return (f"MIXED ENCAPSULATION ({groups}): their Maglev tables differ by design; finish the migration "
            "(README, \"Moving a fleet from fou to gue\") before moving flows between directors")


def _dns_server(config: Config) -> tuple[str, int]:
    assert config.consul is not None
    return config.consul.dns.host, config.consul.dns.port


def srv_records(config: Config, datacenter: str | None = None) -> list[tuple[str, int]]:
    """(address, port) of every healthy agent, from the SRV answer and its additional A records."""
    if config.consul is None:
        raise ConfigError("consul: status --discover needs a consul section (dns_address, service_name)")
    dc = datacenter or config.consul.datacenter
    name = f"{config.consul.service_name}.service.{dc + '.' if dc else ''}consul."
    host, port = _dns_server(config)
    response = dns.query.udp(dns.message.make_query(name, dns.rdatatype.SRV), host, port=port, timeout=5)
    addresses = {rrset.name.to_text(): rr.address for rrset in response.additional
                 if rrset.rdtype == dns.rdatatype.A for rr in rrset}
    found = []
    for rrset in response.answer:
        for rr in rrset:
            if rr.rdtype == dns.rdatatype.SRV:
                found.append((addresses.get(rr.target.to_text(), rr.target.to_text().rstrip(".")), int(rr.port)))
    return sorted(found)


def fetch_status(address: str, port: int, timeout: float = 5.0) -> Director:
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/status", timeout=timeout) as response:
            return Director(address, port, read_report(response.read()))
    except (OSError, urllib.error.URLError) as exc:
        return Director(address, port, error=str(exc))
    except msgspec.DecodeError as exc:
        return Director(address, port, error=f"not a /status answer: {exc}")


def discover(config: Config, datacenter: str | None = None) -> Discovery:
    found = Discovery()
    for address, port in srv_records(config, datacenter):
        director = fetch_status(address, port)
        found.directors.append(director)
        for vs in director.status.virtual_services if director.status else ():
            found.fingerprints[vs.key.text][director.label] = vs.fingerprint or ""
    return found


def discovery_text(found: Discovery) -> str:
    lines = [f"{'DIRECTOR':<22} {'ROLE':<9} {'VERSION':<12} {'STATE':<9} {'VIRTUAL SERVICE':<24} {'REAL':>4} "
             f"{'TABLE':<17} AGREES"]
    bad = set(found.disagreeing)
    maintained: list[str] = []
    for d in found.directors:
        if d.status is None:
            lines.append(f"{d.label:<22} {'?':<9} {'?':<12} {'DOWN':<9} {d.error}")
            continue
        agent = d.status.agent
        state = "degraded" if agent.degraded else ("ready" if agent.ready else "starting")
        if agent.maintenance and agent.maintenance.get("on"):
            state = "maint"
            maintained.append(f"{d.label} {maintenance_text(agent.maintenance)}")
        who = f"{d.label:<22} {agent.role:<9} {agent.version:<12} {state:<9}"
        if not d.status.virtual_services:
            lines.append(f"{who} (none)")
        for vs in d.status.virtual_services:
            key = vs.key.text
            agrees = "NO: tables differ" if key in bad else "yes"
            lines.append(f"{who} {key:<24} {len(vs.real_servers):>4} {vs.fingerprint or '-':<17} {agrees}")
    lines.extend(f"maintenance: {line}" for line in maintained)
    mixed = mixed_text(found.encapsulations)
    if mixed:
        lines.append(mixed)
    lines.append(f"{len(found.directors)} director(s); " + (
        f"{len(bad)} virtual service(s) with differing tables: {', '.join(sorted(bad))}" if bad
        else "all agree on every virtual service"))
    return "\n".join(lines)
