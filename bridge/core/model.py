"""Plain data that flows through the pipeline: catalog snapshot -> desired state -> kernel operations.

Everything here is immutable and ordered so that two directors that hold equal inputs hold equal
values: the determinism the product promises starts with the data having no hidden order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from typing import Literal

from bridge.core.encap import DIRECT_ROUTING, Encapsulation, Forwarding
from bridge.core.keys import Protocol, ServiceKey

Health = Literal["passing", "warning", "critical"]


@dataclass(frozen=True)
class Instance:
    """One service instance as the catalog reports it, health already folded over all its checks."""

    service: str
    instance_id: str
    node: str
    address: str
    port: int
    tags: tuple[str, ...]
    health: Health
    create_index: int


@dataclass(frozen=True)
class Snapshot:
    """Everything the core needs from a catalog, in a stable order (by service, node, instance id)."""

    instances: tuple[Instance, ...]
    groups: Mapping[str, tuple[Instance, ...]] | None = field(default=None, compare=False, repr=False)
    """The same instances per service, when the source already holds them that way (the Consul source
    does, and keeps the tuples of unchanged services, so the DesiredBook spots changes by identity)."""
    rejected: tuple[Rejection, ...] = ()
    """Catalog entries that did not fit the schema, each refused alone at the boundary."""

    @classmethod
    def of_services(cls, groups: Mapping[str, tuple[Instance, ...]],
                    rejected: tuple[Rejection, ...] = ()) -> Snapshot:
        ordered = {name: groups[name] for name in sorted(groups)}
        return cls(tuple(chain.from_iterable(ordered.values())), ordered, rejected)

    def by_service(self) -> Mapping[str, tuple[Instance, ...]]:
        if self.groups is not None:
            return self.groups
        found: dict[str, list[Instance]] = {}
        for instance in self.instances:
            found.setdefault(instance.service, []).append(instance)
        return {name: tuple(items) for name, items in found.items()}


@dataclass(frozen=True)
class Rejection:
    """A claim that was refused, with enough context that an operator can fix the tag."""

    service: str
    instance: str
    tag: str
    reason: str


@dataclass(frozen=True)
class RealServer:
    """One backend node behind one virtual service.

    `weight` is what the kernel should report now; `last_weight` is the last non-zero weight the kernel
    must remember for it (ip_vs_mh builds its table from that), which is why a critical real server is
    added with its tagged weight and then set to 0.  `order_key` fixes its place in the kernel's list.
    """

    address: str
    port: int
    weight: int
    last_weight: int
    backend: str
    node: str
    order_key: int
    standby: Forwarding | None = None
    """Set on a standby real server (`standby_encapsulation`): its own forwarding, another encapsulation than
    the director's. It is added at weight 0 and kept there, so it never has a last weight and takes no slot
    (ip_vs_mh skips a real server whose last weight is 0): the table stays the director's own, and a connection
    another director synchronises in that encapsulation has a real server to bind to here. None: a real server
    of the director's encapsulation (`DesiredState.forwarding`)."""


@dataclass(frozen=True)
class VirtualService:
    vip: str
    port: int
    protocol: Protocol
    scheduler: str
    flags: tuple[str, ...]
    service: str
    real_servers: tuple[RealServer, ...] = field(default=())
    """Kernel list order, head first (descending `order_key`)."""
    allow: tuple[str, ...] | None = None
    """Source prefixes that may reach the service (bridge/core/allow.py); None: everyone."""

    @cached_property
    def key(self) -> ServiceKey:
        """Made once per value (frozen dataclasses keep a cached_property in their __dict__): the planner
        asks for it several times per virtual service."""
        return ServiceKey(self.vip, self.port, self.protocol)


@dataclass(frozen=True)
class Tunnel:
    """An ipip link with FOU encapsulation towards one backend, plus the route to its tunnel address."""

    name: str
    remote: str
    local: str
    tunnel_address: str
    fou_port: int


@dataclass(frozen=True)
class SyncDaemon:
    """One IPVS connection sync daemon: `state` is master (sends) or backup (receives)."""

    state: Literal["master", "backup"]
    interface: str
    syncid: int


@dataclass(frozen=True)
class DesiredState:
    virtual_services: tuple[VirtualService, ...]
    tunnels: tuple[Tunnel, ...]
    vip_routes: tuple[str, ...]
    rejected: tuple[Rejection, ...]
    sysctls: tuple[tuple[str, int], ...] = ()
    """The director's IPVS sysctls (name, value), from the configuration."""
    sync_daemons: tuple[SyncDaemon, ...] | None = None
    """The connection sync daemons, master and backup; None when `conn_sync` is not configured (the agent
    then never touches them)."""
    forwarding: Forwarding = DIRECT_ROUTING
    """How every real server forwards (fleet-wide, from `encapsulation`; bridge/core/encap.py)."""
    retire: Encapsulation | None = None
    """`retire_encapsulation`: the unwanted real servers of this encapsulation go once they hold no connection."""


TABLE_SIZES: tuple[int, ...] = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
"""The table sizes IPVS's mh scheduler accepts: `primes[CONFIG_IP_VS_MH_TAB_INDEX - 8]` for the Kconfig range
8..17 (ip_vs_mh.c). `mh_table_size` must be one."""
