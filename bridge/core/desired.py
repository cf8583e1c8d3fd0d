"""Catalog + configuration -> the state every director must hold. Pure and deterministic.

Nothing here may depend on history, timing or the local kernel: two directors that read the same
catalog must compute equal values, because ip_vs_mh only sends a flow to the same backend everywhere
when the real-server lists, their order and their remembered weights are equal everywhere.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from bridge.core.addr import canonical_ip, ip_value, ipv4_int, ipv4_text
from bridge.core.allow import for_family
from bridge.core.config import Config
from bridge.core.gcpause import gc_paused
from bridge.core.keys import ServiceKey
from bridge.core.model import (
    DesiredState,
    Instance,
    RealServer,
    Rejection,
    Snapshot,
    SyncDaemon,
    Tunnel,
    VirtualService,
)
from bridge.core.printable import printable
from bridge.core.tags import Claim, InstanceClaim, TagParser

log = logging.getLogger("maglev-bridge")
INT32_MAX = 2**31 - 1
CACHE_LIMIT = 500_000


class _Backed(NamedTuple):
    """An accepted instance claim with its real-server address resolved (one per instance, hence a
    NamedTuple: cheap to make): the backend's tunnel address in `fou` mode, its own address in `gue` mode."""

    claim: InstanceClaim
    address: str


def _serves(instance: Instance, config: Config) -> bool:
    return instance.health == "passing" or (instance.health == "warning" and config.warning_serves)


def _resolve_backend(claim: InstanceClaim, config: Config, tunnels: dict[str, str | None]) -> _Backed | Rejection:
    instance = claim.instance
    known = tunnels.get(instance.address)
    if known is not None:
        return _refuse_mixed_families(claim, known, config) or _Backed(claim, known)
    try:
        family = ip_value(instance.address).family
    except ValueError:
        return _rejection(claim, f"backend address {instance.address!r} is not an IPv4 or IPv6 address")
    if config.encapsulation == "gue":
        address = canonical_ip(instance.address)
        tunnels[instance.address] = address  # IPVS encapsulates to the backend itself, over either family
        return _refuse_mixed_families(claim, address, config) or _Backed(claim, address)
    if family == 6:
        return _rejection(claim, f"backend address {instance.address} is IPv6: encapsulation fou reaches backends "
                                 "through ipip+fou links, which carry IPv4 only; IPv6 backends need "
                                 "encapsulation: gue")
    tunnel = config.tunnel_address(ipv4_int(instance.address))
    if tunnel is None:
        mapped = ", ".join(str(m.backend) for m in config.tunnel_map) or "none configured"
        return _rejection(claim, f"backend {instance.address} is outside every tunnel_map backend prefix ({mapped})")
    tunnels[instance.address] = ipv4_text(tunnel)
    return _Backed(claim, ipv4_text(tunnel))


def _rejection(claim: InstanceClaim, reason: str, tag: str | None = None) -> Rejection:
    instance = claim.instance
    return Rejection(instance.service, instance.instance_id, tag or claim.claims[0].tag, reason)


def _refuse_mixed_families(claim: InstanceClaim, address: str, config: Config) -> Rejection | None:
    """IPVS takes a real server of another family than its service only with tunnel forwarding (which `gue`
    mode gives every real server), but two such pairs are refused here, whole claim, rather than built:

    - an IPv6 backend of an IPv4 VIP: `ip_vs_mh_permutate` hashes a real server by its service's family, so of
      an IPv6 address only the first 32 bits count, every backend of one /32 gets the same Maglev permutation,
      and removing one of ten moves 80% of the table between the others instead of 1-2% (README: underlays).
      Maglev's minimal disruption is what lets connections survive a later director failover.
    - any mixed pair with `conn_sync`: the sync protocol cannot carry such connections (ip_vs_ctl.c refuses the
      real server, and a daemon while one exists, with EINVAL), which would fail in the kernel on every pass.
    An IPv4 backend of an IPv6 VIP hashes its whole address (12 zero bytes XOR to nothing) and is built.
    A string test, not a parse, for the common case: every claim of a 100,000-instance catalog passes here."""
    family = 6 if ":" in address else 4
    if family == 4 and config.conn_sync is None:
        return None
    for c in claim.claims:
        if family == 6 and c.key.family == 4:
            return _rejection(claim, f"backend address {address} is IPv6 and VIP {c.vip} is IPv4: the kernel's "
                                     "Maglev hashes only the first 32 bits of an IPv4 VIP's IPv6 real servers, so "
                                     "backends of one /32 share one permutation and any change moves most flows; "
                                     f"use an IPv6 VIP ([...]:{c.key.port}) or give the instance an IPv4 address",
                              c.tag)
        if config.conn_sync is not None and c.key.family != family:
            return _rejection(claim, f"backend address {address} is IPv{family} and VIP {c.vip} is "
                                     f"IPv{c.key.family}: the kernel's connection sync (conn_sync) cannot carry "
                                     "a real server of another address family than its VIP; give the instance "
                                     f"an IPv{c.key.family} address or remove conn_sync", c.tag)
    return None


def _first_claim(backed: Iterable[_Backed]) -> _Backed:
    return min(backed, key=lambda b: (b.claim.instance.create_index, b.claim.instance.instance_id))


def _resolve_conflicts(
    by_key: dict[ServiceKey, dict[str, list[_Backed]]],
) -> tuple[dict[ServiceKey, tuple[str, list[_Backed]]], list[Rejection]]:
    """The service registered earliest (lowest CreateIndex, then name) keeps a contested VIP:port/proto.

    Only catalog facts decide, never which claim this director happened to see first.
    """
    winners: dict[ServiceKey, tuple[str, list[_Backed]]] = {}
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
                        f"{key} is already claimed by service {winner!r}, registered earlier",
                    )
                )
    return winners, rejected


def _real_servers(backed: list[_Backed], port: int, config: Config) -> tuple[RealServer, ...]:
    by_address: dict[str, list[_Backed]] = defaultdict(list)
    for b in backed:
        by_address[b.address].append(b)
    servers = []
    for address, group in by_address.items():
        tagged = serving = 0
        for b in group:
            tagged += b.claim.weight
            if _serves(b.claim.instance, config):
                serving += b.claim.weight
        first = group[0].claim.instance if len(group) == 1 else _first_claim(group).claim.instance
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
    servers.sort(key=lambda r: (r.order_key, ip_value(r.address)), reverse=True)
    return _standby_servers(backed, port, config) + tuple(servers)


def _standby_servers(backed: list[_Backed], port: int, config: Config) -> tuple[RealServer, ...]:
    """The standby real servers (`standby_encapsulation`), one per backend whatever its health (each is where a
    peer's synchronised connections to that backend bind), at weight 0 with no last weight. In front of the
    director's own: the kernel puts what is added later at the head, so a director that gets the key keeps its
    list as it is, and the switch to the standby's encapsulation leaves them where they are."""
    standby = config.standby_forwarding
    if standby is None:
        return ()
    first: dict[str, Instance] = {}
    for b in backed:
        instance = b.claim.instance
        known = first.get(instance.address)
        if known is None or (instance.create_index, instance.instance_id) < (known.create_index, known.instance_id):
            first[instance.address] = instance
    servers = [RealServer(address, port, 0, 0, address, i.node, i.create_index, standby)
               for address, i in first.items()]
    servers.sort(key=lambda r: (r.order_key, ip_value(r.address)), reverse=True)
    return tuple(servers)


def _virtual_service(key: ServiceKey, service: str, backed: list[_Backed], config: Config) -> VirtualService:
    """Flags and allow list are the earliest instance's (lowest CreateIndex, then instance id): one rule for
    every per-service setting, decided from the catalog alone. For the allow list this is also the safe
    choice: a union would let any one instance, a stray or a typo, open the VIP to more sources than the
    service's owner set, and an intersection would let one close it. A rolling change of the list takes
    effect when the earliest instance is replaced."""
    vip, port, protocol = key
    first = _first_claim(backed).claim
    return VirtualService(
        vip=vip,
        port=port,
        protocol=protocol,
        scheduler="mh",
        flags=first.flags,
        service=service,
        real_servers=_real_servers(backed, port, config),
        allow=for_family(first.allow, key.family),
    )


def compute_desired(snapshot: Snapshot, config: Config, local_address: str) -> DesiredState:
    book = DesiredBook(config)
    book.update(snapshot)
    return book.desired(local_address)


@dataclass(frozen=True)
class _Part:
    """One service's share of the desired state: its accepted claims per VIP key and its rejections."""

    instances: tuple[Instance, ...]
    backed: dict[ServiceKey, list[_Backed]]
    rejected: tuple[Rejection, ...]


class DesiredBook:
    """The desired state kept per service, so that a change to one service recomputes only the virtual
    services that service claims. Still pure (no I/O, no clock): `update` with any snapshot leaves the book
    exactly where a fresh book would be after that one snapshot, which the unit tests check on random
    histories. `compute_desired` is a fresh book, so there is one implementation, not two."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._parser = TagParser(config)
        self._tunnels: dict[str, str | None] = {}
        self._parts: dict[str, _Part] = {}
        self._claimants: dict[ServiceKey, set[str]] = defaultdict(set)
        self._services: dict[ServiceKey, VirtualService] = {}
        self._conflicts: dict[ServiceKey, list[Rejection]] = {}
        self._order: tuple[ServiceKey, ...] | None = ()
        """Keys in kernel-listing order; None when the key set changed since it was sorted."""
        self._backends: Counter[tuple[str, str]] = Counter()
        """(backend, tunnel address) -> how many real servers use it: the tunnels, kept as VSs change."""
        self._tunnel_list: tuple[str, tuple[Tunnel, ...]] | None = None
        self._desired: tuple[str, DesiredState] | None = None
        self._entry_rejections: tuple[Rejection, ...] = ()
        self.failures: dict[str, str] = {}
        """Service -> why its desired state could not be computed (a bug, not bad data: bad data is a
        Rejection). Such a service keeps the value it had before, so its kernel state stays (fail static)."""

    @property
    def unknown(self) -> frozenset[str]:
        """Failed services with no earlier value to keep: a full pass must not take their absence for a
        withdrawal."""
        return frozenset(self.failures.keys() - self._parts.keys())

    def update(self, snapshot: Snapshot) -> frozenset[ServiceKey]:
        """Take a new snapshot; the keys of the virtual services whose desired value changed (added,
        edited or withdrawn)."""
        self._trim_caches()
        with gc_paused():
            if snapshot.rejected != self._entry_rejections:
                self._entry_rejections = snapshot.rejected
                self._desired = None
            groups = snapshot.by_service()
            touched: set[ServiceKey] = set()
            for name in (self._parts.keys() | self.failures.keys()) - groups.keys():
                self.failures.pop(name, None)
                touched |= self._replace(name, ())
            for name, instances in groups.items():
                part = self._parts.get(name)
                if part is None or (part.instances is not instances and part.instances != instances):
                    touched |= self._replace_or_keep(name, instances)
            return frozenset(key for key in touched if self._settle_or_keep(key))

    def _replace_or_keep(self, name: str, instances: tuple[Instance, ...]) -> set[ServiceKey]:
        try:
            touched = self._replace(name, instances)
        except Exception as exc:
            self._failed(name, exc)
            return set()
        self.failures.pop(name, None)
        return touched

    def _settle_or_keep(self, key: ServiceKey) -> bool:
        """A virtual service that cannot be settled keeps its old value; its claimants are named as failed."""
        try:
            return self._settle(key)
        except Exception as exc:
            for name in sorted(self._claimants.get(key, ())):
                self._failed(name, exc)
            return False

    def _failed(self, name: str, exc: Exception) -> None:
        message = f"{exc.__class__.__name__}: {exc}"
        if self.failures.get(name) != message:
            log.exception("service %s: desired state could not be computed; keeping its last one", printable(name))
        self.failures[name] = message

    def _trim_caches(self) -> None:
        """A long-lived agent sees tag sets and backends come and go; the parse caches must not grow forever."""
        if self._parser.cached() > CACHE_LIMIT:
            self._parser = TagParser(self.config)
        if len(self._tunnels) > CACHE_LIMIT:
            self._tunnels = {}

    def _replace(self, name: str, instances: tuple[Instance, ...]) -> set[ServiceKey]:
        part = self._part(instances) if instances else None  # first: if it raises, nothing has changed
        old = self._parts.pop(name, None)
        keys = set(old.backed) if old else set()
        for key in keys:
            self._claimants[key].discard(name)
        if part is not None:
            self._parts[name] = part
            for key in part.backed:
                self._claimants[key].add(name)
            keys |= part.backed.keys()
        self._desired = None
        return keys

    def _part(self, instances: tuple[Instance, ...]) -> _Part:
        backed: dict[ServiceKey, list[_Backed]] = defaultdict(list)
        rejected: list[Rejection] = []
        for instance in instances:
            parsed = self._parser.parse(instance)
            if parsed is None:
                continue
            resolved = parsed if isinstance(parsed, Rejection) else _resolve_backend(parsed, self.config, self._tunnels)
            if isinstance(resolved, Rejection):
                rejected.append(resolved)
                continue
            for claim in resolved.claim.claims:
                backed[claim.key].append(resolved)
        return _Part(instances, dict(backed), tuple(rejected))

    def _settle(self, key: ServiceKey) -> bool:
        """Re-decide one VIP key among the services claiming it; True when its virtual service changed."""
        names = self._claimants.get(key)
        old = self._services.get(key)
        new = None
        if names:
            winners, conflicts = _resolve_conflicts({key: {n: self._parts[n].backed[key] for n in sorted(names)}})
            service, backed = winners[key]
            self._conflicts[key] = conflicts
            new = self._services[key] = _virtual_service(key, service, backed, self.config)
        else:
            self._claimants.pop(key, None)
            self._conflicts.pop(key, None)
            self._services.pop(key, None)
        if new == old:
            return False
        if (old is None) != (new is None):
            self._order = None
        self._count_backends(old, -1)
        self._count_backends(new, +1)
        return True

    def _count_backends(self, vs: VirtualService | None, step: int) -> None:
        for rs in vs.real_servers if vs else ():
            if rs.standby is not None:
                continue  # its own forwarding reaches the backend: no tunnel
            pair = (rs.backend, rs.address)
            count = self._backends[pair] + step
            if not count or pair not in self._backends:
                self._tunnel_list = None  # a backend appeared or went: the tunnel list changes
            if count:
                self._backends[pair] = count
            else:
                del self._backends[pair]

    def desired(self, local_address: str) -> DesiredState:
        if self._desired is not None and self._desired[0] == local_address:
            return self._desired[1]
        if self._order is None:
            self._order = tuple(sorted(self._services, key=ServiceKey.listing_order))
        rejected = [r for part in self._parts.values() for r in part.rejected]
        rejected += self._entry_rejections
        rejected += [r for found in self._conflicts.values() for r in found]
        desired = DesiredState(
            virtual_services=tuple(self._services[key] for key in self._order),
            tunnels=self._tunnels_for(local_address),
            vip_routes=tuple(dict.fromkeys(key.vip for key in self._order)),
            rejected=tuple(sorted(rejected, key=lambda r: (r.service, r.instance, r.tag))),
            sysctls=self.config.sysctls,
            sync_daemons=_sync_daemons(self.config),
            forwarding=self.config.forwarding,
            retire=self.config.retire_encapsulation,
        )
        self._desired = (local_address, desired)
        return desired

    def _tunnels_for(self, local_address: str) -> tuple[Tunnel, ...]:
        """One tunnel per backend that any real server uses, re-listed only when that set changed; none in
        `gue` mode, where IPVS encapsulates itself."""
        if self.config.encapsulation == "gue":
            return ()
        if self._tunnel_list is None or self._tunnel_list[0] != local_address:
            tunnels = tuple(
                _tunnel(self.config.link_prefix, backend, local_address, tunnel_address, self.config.fou_port)
                for backend, tunnel_address in sorted(self._backends, key=lambda pair: ipv4_int(pair[0]))
            )
            self._tunnel_list = (local_address, tunnels)
        return self._tunnel_list[1]


def _sync_daemons(config: Config) -> tuple[SyncDaemon, ...] | None:
    """Master and backup on every director: each sends the connections it carries and learns the others'."""
    sync = config.conn_sync
    if sync is None:
        return None
    return (SyncDaemon("master", sync.interface, sync.syncid), SyncDaemon("backup", sync.interface, sync.syncid))


@lru_cache(maxsize=65536)
def _tunnel(link_prefix: str, backend: str, local_address: str, tunnel_address: str, fou_port: int) -> Tunnel:
    """The link name is deterministic and reversible, so a restarted agent recognises its own links. Cached:
    every pass after a change lists every tunnel again, and they almost never change."""
    return Tunnel(f"{link_prefix}{ipv4_int(backend):08x}", backend, local_address, tunnel_address, fou_port)


def claims_of_node(snapshot: Snapshot, config: Config, node: str) -> tuple[tuple[Claim, ...], dict[str, str]]:
    """The VIPs that the backend role must accept locally: every valid claim of this node's instances,
    critical ones included, so their established connections keep working while they drain. Also the
    services whose claims could not be computed (a bug, not bad data), with why: the caller must then keep
    the VIPs it has (fail static), since it cannot know which of them those services claim."""
    found: dict[ServiceKey, Claim] = {}
    failures: dict[str, str] = {}
    parser = TagParser(config)
    for instance in snapshot.instances:
        if instance.node != node:
            continue
        try:
            parsed = parser.parse(instance)
        except Exception as exc:
            log.exception("service %s: claims of instance %s could not be computed", printable(instance.service),
                          printable(instance.instance_id))
            failures[instance.service] = f"{exc.__class__.__name__}: {exc}"
            continue
        if isinstance(parsed, InstanceClaim):
            for claim in parsed.claims:
                found.setdefault(claim.key, claim)
    return tuple(found[k] for k in sorted(found, key=ServiceKey.listing_order)), failures
