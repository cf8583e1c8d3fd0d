"""`status`: what this agent owns in the kernel, the table fingerprint each virtual service implies, and
the last pass's report from the state file."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from bridge.core.addr import bracketed
from bridge.core.config import Config
from bridge.core.encap import Forwarding, ipv6_underlay
from bridge.core.keys import DestKey, ServiceKey
from bridge.core.live import LiveService, LiveState
from bridge.core.maglev import Dest, build_table, fingerprint
from bridge.core.memory import last_weight
from bridge.dataplane.errors import ApplyError
from bridge.dataplane.kernel import Kernel, open_kernel
from bridge.files.maintenance import maintenance_json, read_maintenance
from bridge.files.store import load_state
from bridge.inspect.errors import ExplainError
from bridge.inspect.explain import ServiceView
from bridge.inspect.text import status_json


def live_dests(service: LiveService, last_weights: Mapping[DestKey, int]) -> tuple[tuple[Dest, ...], tuple[str, ...]]:
    """The kernel's dests as the model needs them, and the real servers whose remembered weight had to
    be assumed (the kernel never reports last_weight, and this agent has no memory of it)."""
    assumed = []
    dests = []
    for rs in service.real_servers:
        last = last_weight(service.key, rs, last_weights)
        if last is None:
            assumed.append(f"{bracketed(rs.address)}:{rs.port}")
            last = 0
        dests.append(Dest(rs.address, rs.port, rs.weight, last))
    return tuple(dests), tuple(assumed)


def standby_servers(services: tuple[LiveService, ...], last_weights: Mapping[DestKey, int],
                    standby: Forwarding | None) -> frozenset[DestKey]:
    """The real servers `status` calls standby: with the standby's forwarding, at weight 0 and known to have no
    last weight (so no slot). One the agent cannot vouch for (no memory of it, or set to 0 from a weight) is
    listed as what it is, a real server at weight 0."""
    if standby is None:
        return frozenset()
    return frozenset(DestKey(service.key, rs.address, rs.port) for service in services for rs in service.real_servers
                     if rs.forwarding == standby and last_weight(service.key, rs, last_weights) == 0)


def live_view(config: Config, key: ServiceKey) -> ServiceView:
    """One live virtual service, with each real server traced through its route and tunnel to its backend (in
    `gue` mode the real server is the backend, reached by IPVS's own tunnel)."""
    stored = load_state(config.state_file)
    with open_kernel(config) as kernel:
        live = kernel.read()
    service = next((s for s in live.services if s.key == key), None)
    if service is None:
        raise ExplainError(f"{key}: no such virtual service owned by this agent in the kernel")
    remotes = {link.name: link.remote for link in live.links}
    backends = {r.dst: remotes[r.dev] or "" for r in live.routes if r.table == "main" and r.dev in remotes}
    backends.update((rs.address, f"{rs.address} via {rs.forwarding.describe()}") for rs in service.real_servers
                    if rs.forwarding.method == "tunnel")  # gue: IPVS encapsulates to the backend itself
    dests, assumed = live_dests(service, stored.memory.last_weights)
    entry = next((e for e in live.filter.allows if e.key == key), None)
    return ServiceView(key.text, service.flags, dests, backends, assumed,
                       allow=entry.prefixes if entry else None)


def _mtu_warning(config: Config, kernel: Kernel, live: LiveState) -> str | None:
    """A director's underlay MTU problem; none for a backend (it only receives) or without an underlay."""
    if config.role != "director":
        return None
    try:
        return kernel.mtu_warning(config.local_address or kernel.default_local_address(), ipv6_underlay(
            rs.address for service in live.services for rs in service.real_servers))
    except ApplyError:
        return None


@lru_cache(maxsize=8192)
def table_fingerprint(dests: tuple[Dest, ...], size: int) -> str:
    """Cached: a table costs milliseconds to build, and every /metrics scrape asks for all of them, of which
    only those whose real servers changed since the last scrape are new."""
    return fingerprint(build_table(dests, size))


def service_fingerprints(services: tuple[LiveService, ...], last_weights: Mapping[DestKey, int],
                         size: int) -> dict[ServiceKey, str]:
    """A '?' marks a fingerprint that rests on an assumed remembered weight."""
    prints = {}
    for service in services:
        dests, assumed = live_dests(service, last_weights)
        prints[service.key] = table_fingerprint(dests, size) + ("?" if assumed else "")
    return prints


def read_status(config: Config) -> dict[str, Any]:
    stored = load_state(config.state_file)
    with open_kernel(config) as kernel:
        try:
            live = kernel.read()
            kernel_note = None
        except ApplyError as exc:
            live = kernel.read(services=False)
            kernel_note = str(exc)
        mtu = _mtu_warning(config, kernel, live)
    prints = service_fingerprints(live.services, stored.memory.last_weights, config.mh_table_size)
    data = status_json(live, stored.report, prints, standby_servers(live.services, stored.memory.last_weights,
                                                                     config.standby_forwarding))
    data["kernel_note"] = kernel_note
    data["encapsulation"] = config.encapsulation if config.role == "director" else None
    data["standby_encapsulation"] = config.standby_encapsulation if config.role == "director" else None
    data["mtu_warning"] = mtu
    if config.bgp is not None:
        data["bgp_table"] = config.bgp.table
        data["maintenance"] = maintenance_json(read_maintenance(config.bgp.maintenance_file))
    return data
