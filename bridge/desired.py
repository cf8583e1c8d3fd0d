"""Catalog + configuration -> the state every director must hold. Pure and deterministic.

Nothing here may depend on history, timing or the local kernel: two directors that read the same
catalog must compute equal values, because ip_vs_mh only sends a flow to the same backend everywhere
when the real-server lists, their order and their remembered weights are equal everywhere.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from bridge.config import Config
from bridge.model import DesiredState, Instance, RealServer, Rejection, Snapshot, Tunnel, VirtualService
from bridge.tags import Claim, InstanceClaim, parse_instance

INT32_MAX = 2**31 - 1
VsKey = tuple[str, int, str]


@dataclass(frozen=True)
class _Backed:
    """An accepted instance claim with its backend's tunnel address resolved."""

    claim: InstanceClaim
    tunnel_address: str


def link_name(config: Config, backend: str) -> str:
    """Deterministic and reversible, so a restarted agent recognises its own links."""
    return f"{config.link_prefix}{int(ipaddress.IPv4Address(backend)):08x}"


def _serves(instance: Instance, config: Config) -> bool:
    return instance.health == "passing" or (instance.health == "warning" and config.warning_serves)


def _resolve_backend(claim: InstanceClaim, config: Config) -> _Backed | Rejection:
    instance = claim.instance
    try:
        backend = ipaddress.IPv4Address(instance.address)
    except ValueError:
        return Rejection(
            instance.service, instance.instance_id, claim.claims[0].tag,
            f"backend address {instance.address!r} is not an IPv4 address",
        )
    tunnel = config.tunnel_address(backend)
    if tunnel is None:
        mapped = ", ".join(str(m.backend) for m in config.tunnel_map) or "none configured"
        return Rejection(
            instance.service, instance.instance_id, claim.claims[0].tag,
            f"backend {backend} is outside every tunnel_map backend prefix ({mapped})",
        )
    return _Backed(claim, str(tunnel))


def _first_claim(backed: Iterable[_Backed]) -> _Backed:
    return min(backed, key=lambda b: (b.claim.instance.create_index, b.claim.instance.instance_id))


def _resolve_conflicts(
    by_key: dict[VsKey, dict[str, list[_Backed]]],
) -> tuple[dict[VsKey, tuple[str, list[_Backed]]], list[Rejection]]:
    """The service registered earliest (lowest CreateIndex, then name) keeps a contested VIP:port/proto.

    Only catalog facts decide, never which claim this director happened to see first.
    """
    winners: dict[VsKey, tuple[str, list[_Backed]]] = {}
    rejected: list[Rejection] = []
    for key, services in by_key.items():
        ranked = sorted(services, key=lambda s: (_first_claim(services[s]).claim.instance.create_index, s))
        winner = ranked[0]
        winners[key] = (winner, services[winner])
        for loser in ranked[1:]:
            for backed in services[loser]:
                claim = next(c for c in backed.claim.claims if c.key == key)
                rejected.append(
                    Rejection(
                        loser, backed.claim.instance.instance_id, claim.tag,
                        f"{key[0]}:{key[1]}/{key[2]} is already claimed by service {winner!r}, registered earlier",
                    )
                )
    return winners, rejected


def _real_servers(backed: list[_Backed], port: int, config: Config) -> tuple[RealServer, ...]:
    by_address: dict[str, list[_Backed]] = defaultdict(list)
    for b in backed:
        by_address[b.tunnel_address].append(b)
    servers = []
    for address, group in by_address.items():
        tagged = sum(b.claim.weight for b in group)
        serving = sum(b.claim.weight for b in group if _serves(b.claim.instance, config))
        first = _first_claim(group).claim.instance
        servers.append(
            RealServer(
                address=address,
                port=port,
                weight=min(serving, INT32_MAX),
                last_weight=min(serving or tagged, INT32_MAX),
                backend=first.address,
                node=first.node,
                order_key=first.create_index,
            )
        )
    servers.sort(key=lambda r: (r.order_key, int(ipaddress.IPv4Address(r.address))), reverse=True)
    return tuple(servers)


def _virtual_service(key: VsKey, service: str, backed: list[_Backed], config: Config) -> VirtualService:
    vip, port, protocol = key
    return VirtualService(
        vip=vip,
        port=port,
        protocol="udp" if protocol == "udp" else "tcp",
        scheduler="mh",
        flags=_first_claim(backed).claim.flags,
        service=service,
        real_servers=_real_servers(backed, port, config),
    )


def compute_desired(snapshot: Snapshot, config: Config, local_address: str) -> DesiredState:
    rejected: list[Rejection] = []
    by_key: dict[VsKey, dict[str, list[_Backed]]] = defaultdict(lambda: defaultdict(list))
    for instance in snapshot.instances:
        parsed = parse_instance(instance, config)
        if parsed is None:
            continue
        resolved = parsed if isinstance(parsed, Rejection) else _resolve_backend(parsed, config)
        if isinstance(resolved, Rejection):
            rejected.append(resolved)
            continue
        for claim in resolved.claim.claims:
            by_key[claim.key][instance.service].append(resolved)
    winners, conflicts = _resolve_conflicts(by_key)
    rejected.extend(conflicts)
    services = tuple(
        _virtual_service(key, service, backed, config)
        for key, (service, backed) in sorted(
            winners.items(), key=lambda kv: (ipaddress.IPv4Address(kv[0][0]), kv[0][1], kv[0][2])
        )
    )
    return DesiredState(
        virtual_services=services,
        tunnels=tunnels_for(services, config, local_address),
        vip_routes=tuple(sorted({vs.vip for vs in services}, key=ipaddress.IPv4Address)),
        rejected=tuple(sorted(rejected, key=lambda r: (r.service, r.instance, r.tag))),
    )


def tunnels_for(services: Iterable[VirtualService], config: Config, local_address: str) -> tuple[Tunnel, ...]:
    """One tunnel per backend that any real server uses."""
    backends = {rs.backend: rs.address for vs in services for rs in vs.real_servers}
    return tuple(
        Tunnel(
            name=link_name(config, backend),
            remote=backend,
            local=local_address,
            tunnel_address=tunnel_address,
            fou_port=config.fou_port,
        )
        for backend, tunnel_address in sorted(backends.items(), key=lambda kv: ipaddress.IPv4Address(kv[0]))
    )


def claims_of_node(snapshot: Snapshot, config: Config, node: str) -> tuple[Claim, ...]:
    """The VIPs that the backend role must accept locally: every valid claim of this node's instances,
    critical ones included, so their established connections keep working while they drain."""
    found: dict[VsKey, Claim] = {}
    for instance in snapshot.instances:
        if instance.node != node:
            continue
        parsed = parse_instance(instance, config)
        if isinstance(parsed, InstanceClaim):
            for claim in parsed.claims:
                found.setdefault(claim.key, claim)
    return tuple(found[k] for k in sorted(found, key=lambda k: (ipaddress.IPv4Address(k[0]), k[1], k[2])))
