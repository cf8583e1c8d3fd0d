"""`status --discover`: every director of a data centre, found through Consul DNS (SRV records of the
agents' service), each one's /status in one table, and a flag wherever directors disagree about a VIP's
Maglev table: a flow would reach different backends depending on which director the router picks."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import dns.message
import dns.query
import dns.rdatatype

from bridge.core.config import Config, ConfigError
from bridge.inspect.text import maintenance_text, service_label


@dataclass(frozen=True)
class Director:
    address: str
    port: int
    status: dict[str, Any] | None = None
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
            return Director(address, port, json.loads(response.read()))
    except (OSError, urllib.error.URLError, ValueError) as exc:
        return Director(address, port, error=str(exc))


def discover(config: Config, datacenter: str | None = None) -> Discovery:
    found = Discovery()
    for address, port in srv_records(config, datacenter):
        director = fetch_status(address, port)
        found.directors.append(director)
        for vs in (director.status or {}).get("virtual_services", []):
            found.fingerprints[service_label(vs)][director.label] = vs["fingerprint"]
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
        agent = d.status.get("agent", {})
        state = "degraded" if agent.get("degraded") else ("ready" if agent.get("ready") else "starting")
        if (agent.get("maintenance") or {}).get("on"):
            state = "maint"
            maintained.append(f"{d.label} {maintenance_text(agent['maintenance'])}")
        who = f"{d.label:<22} {agent.get('role', '?'):<9} {agent.get('version', '?'):<12} {state:<9}"
        services = d.status.get("virtual_services", [])
        if not services:
            lines.append(f"{who} (none)")
        for vs in services:
            key = service_label(vs)
            agrees = "NO: tables differ" if key in bad else "yes"
            lines.append(f"{who} {key:<24} {len(vs['real_servers']):>4} {vs['fingerprint'] or '-':<17} {agrees}")
    lines.extend(f"maintenance: {line}" for line in maintained)
    lines.append(f"{len(found.directors)} director(s); " + (
        f"{len(bad)} virtual service(s) with differing tables: {', '.join(sorted(bad))}" if bad
        else "all agree on every virtual service"))
    return "\n".join(lines)
