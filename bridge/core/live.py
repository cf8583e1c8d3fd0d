"""What the kernel holds now, restricted to what the agent owns, as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from bridge.core.encap import DIRECT_ROUTING, Forwarding
from bridge.core.keys import Protocol, ServiceKey
from bridge.core.model import SyncDaemon


@dataclass(frozen=True)
class DestStats:
    """A real server's counters since it was added (IPVS_DEST_ATTR_STATS64): what /metrics exports."""

    connections: int = 0
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True)
class LiveRealServer:
    address: str
    port: int
    weight: int
    active_conns: int = 0
    inactive_conns: int = 0
    stats: DestStats = field(default_factory=DestStats)
    forwarding: Forwarding = DIRECT_ROUTING


@dataclass(frozen=True)
class LiveService:
    vip: str
    port: int
    protocol: Protocol
    scheduler: str
    flags: tuple[str, ...]
    real_servers: tuple[LiveRealServer, ...] = ()
    """Kernel list order, head first: the order ip_vs_mh fills its table in."""

    @cached_property
    def key(self) -> ServiceKey:
        """Made once per value, as VirtualService.key."""
        return ServiceKey(self.vip, self.port, self.protocol)


@dataclass(frozen=True)
class LiveLink:
    name: str
    kind: str
    remote: str | None
    local: str | None
    encap_type: int
    encap_dport: int
    up: bool


@dataclass(frozen=True)
class LiveRoute:
    """An agent-owned route: a VIP's local route (table local) or a tunnel address route (main)."""

    dst: str
    table: str
    dev: str


@dataclass(frozen=True)
class LiveAllow:
    """One virtual service's entry in the agent's nftables table (bridge/dataplane/nft.py)."""

    key: ServiceKey
    prefixes: tuple[str, ...] | None
    """The set's elements as prefixes; None when the set is missing."""
    rule: int | None
    """The handle of the rule dropping other sources; None when it is missing."""
    counter: bool
    drops: int = 0
    """Packets the rule dropped (its named counter)."""

    @property
    def whole(self) -> bool:
        return self.prefixes is not None and self.rule is not None and self.counter


@dataclass(frozen=True)
class LiveFilter:
    """The agent's nftables table as plain data; `table` is False until the table and its chain exist."""

    table: bool = False
    allows: tuple[LiveAllow, ...] = ()


@dataclass(frozen=True)
class LiveState:
    services: tuple[LiveService, ...] = ()
    links: tuple[LiveLink, ...] = ()
    routes: tuple[LiveRoute, ...] = ()
    sysctls: tuple[tuple[str, int | None], ...] = ()
    """The listed sysctls' values (None: the kernel has no such sysctl, e.g. ip_vs not loaded)."""
    announced: tuple[str, ...] = ()
    """VIPs with an announce route (agent's protocol, announce table), when a `bgp` section is set."""
    sync_daemons: tuple[SyncDaemon, ...] = ()
    """The IPVS connection sync daemons running, when a `conn_sync` section is set."""
    filter: LiveFilter = LiveFilter()
    """The agent's nftables table (a director's source allow lists)."""
