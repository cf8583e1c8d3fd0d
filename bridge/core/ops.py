"""Kernel operations: the plan's vocabulary. Each one is a single netlink request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from bridge.core.addr import bracketed, host_prefix
from bridge.core.encap import DIRECT_ROUTING, Forwarding
from bridge.core.keys import ServiceKey
from bridge.core.model import SyncDaemon, Tunnel


@dataclass(frozen=True)
class _ServiceSpec:
    verb: ClassVar[str]
    key: ServiceKey
    scheduler: str
    flags: tuple[str, ...]

    def describe(self) -> str:
        flags = ",".join(self.flags) or "-"
        return f"{self.verb} service {self.key} scheduler {self.scheduler} flags {flags}"


class AddService(_ServiceSpec):
    verb = "add"


class SetService(_ServiceSpec):
    verb = "set"


@dataclass(frozen=True)
class DelService:
    key: ServiceKey

    def describe(self) -> str:
        return f"delete service {self.key}"


@dataclass(frozen=True)
class _DestWeight:
    verb: ClassVar[str]
    key: ServiceKey
    address: str
    port: int
    weight: int
    forwarding: Forwarding = DIRECT_ROUTING
    """Sent with every add and set: the kernel's SET_DEST takes the forwarding method and tunnel settings
    from the request (absent tunnel attributes mean ipip, port 0), so a weight change must repeat them."""
    standby: bool = False
    """A standby real server's (`standby_encapsulation`): said in the plan, not sent."""

    def describe(self) -> str:
        note = " (standby)" if self.standby else ""
        return (f"{self.verb} real server {bracketed(self.address)}:{self.port} weight {self.weight}"
                f"{self.forwarding.via}{note} in {self.key}")


class AddDest(_DestWeight):
    verb = "add"


class SetDest(_DestWeight):
    verb = "set"


@dataclass(frozen=True)
class DelDest:
    key: ServiceKey
    address: str
    port: int

    def describe(self) -> str:
        return f"delete real server {bracketed(self.address)}:{self.port} in {self.key}"


@dataclass(frozen=True)
class AddLink:
    tunnel: Tunnel

    def describe(self) -> str:
        t = self.tunnel
        return f"add link {t.name} ipip {t.local} -> {t.remote} encap fou dport {t.fou_port}"


@dataclass(frozen=True)
class DelLink:
    name: str

    def describe(self) -> str:
        return f"delete link {self.name}"


@dataclass(frozen=True)
class _RouteSpec:
    verb: ClassVar[str]
    dst: str
    table: str
    dev: str

    def describe(self) -> str:
        kind = "local " if self.table == "local" else ""
        return f"{self.verb} route {kind}{host_prefix(self.dst)} dev {self.dev} table {self.table}"


class AddRoute(_RouteSpec):
    verb = "add"


class DelRoute(_RouteSpec):
    verb = "delete"


@dataclass(frozen=True)
class SetSysctl:
    name: str
    value: int
    old: int | None

    def describe(self) -> str:
        was = "missing" if self.old is None else str(self.old)
        return f"set sysctl {self.name} = {self.value} (was {was})"


@dataclass(frozen=True)
class Announce:
    """Announce a VIP: its route in the announce table, which BIRD learns and exports."""

    vip: str
    table: int

    def describe(self) -> str:
        return f"announce {host_prefix(self.vip)} (route blackhole table {self.table})"


@dataclass(frozen=True)
class Withdraw:
    vip: str
    table: int

    def describe(self) -> str:
        return f"withdraw {host_prefix(self.vip)} (delete route table {self.table})"


@dataclass(frozen=True)
class _SyncDaemonOp:
    verb: ClassVar[str]
    daemon: SyncDaemon

    def describe(self) -> str:
        d = self.daemon
        return f"{self.verb} connection sync {d.state} on {d.interface} syncid {d.syncid}"


class StartSyncDaemon(_SyncDaemonOp):
    verb = "start"


class StopSyncDaemon(_SyncDaemonOp):
    verb = "stop"


@dataclass(frozen=True)
class CreateFilter:
    """The agent's table and its input base chain (nftables `add` leaves existing ones as they are)."""

    def describe(self) -> str:
        return "create nftables table inet maglev_bridge, chain input (hook input priority filter)"


@dataclass(frozen=True)
class AddAllow:
    """A service's allow set, its drop counter and the rule dropping every source outside the set."""

    key: ServiceKey
    prefixes: tuple[str, ...]

    def describe(self) -> str:
        return f"filter {self.key}: allow only {','.join(self.prefixes)}"


@dataclass(frozen=True)
class ChangeAllow:
    """One service's allow set refilled (flushed and filled in the same transaction: removing and adding
    elements one by one could make a new prefix overlap an old one mid-way, which an interval set refuses);
    nothing else is touched."""

    key: ServiceKey
    prefixes: tuple[str, ...]
    old: tuple[str, ...]

    def describe(self) -> str:
        changes = [f"+{p}" for p in self.prefixes if p not in self.old]
        changes += [f"-{p}" for p in self.old if p not in self.prefixes]
        return f"filter {self.key}: allow list {' '.join(changes)}"


@dataclass(frozen=True)
class DelAllow:
    """Whatever exists of a service's rule, set and counter."""

    key: ServiceKey
    rule: int | None
    set: bool
    counter: bool

    def describe(self) -> str:
        return f"filter {self.key}: remove (every source allowed)"


IpvsOp = AddService | SetService | DelService | AddDest | SetDest | DelDest
AnnounceOp = Announce | Withdraw
FilterOp = CreateFilter | AddAllow | ChangeAllow | DelAllow
Op = (IpvsOp | AddLink | DelLink | AddRoute | DelRoute | SetSysctl | AnnounceOp | StartSyncDaemon | StopSyncDaemon
      | FilterOp)


class OpResult(NamedTuple):
    """An operation carried out, with the kernel's reason when it failed (a NamedTuple: one per operation, and a
    full apply of 500 VIPs x 20 backends has 10,500)."""

    op: Op
    error: str | None


Scope = frozenset[ServiceKey] | None
"""The virtual services a pass reads and plans, or None for a full pass."""


def changes_network(op: Op) -> bool:
    """Everything but IPVS services: links, routes, announcements, sysctls, sync daemons."""
    return not isinstance(op, IpvsOp)
