"""`ShadowKernel`, the data plane of shadow mode: a model of what the agent would have built, seeded from
the real kernel once, then moved only by the agent's own operations. Its semantics are the kernel's list
semantics that the kernel tests confirm (a new real server goes to the head of its list).

Pure: it imports no netlink, so the model can be used (and tested) without pyroute2 or a kernel.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

from bridge.core.addr import ip_value
from bridge.core.filter import applied
from bridge.core.keys import ServiceKey
from bridge.core.live import LiveLink, LiveRealServer, LiveRoute, LiveService, LiveState
from bridge.core.model import SyncDaemon
from bridge.core.ops import (
    AddAllow,
    AddDest,
    AddLink,
    AddRoute,
    AddService,
    Announce,
    ChangeAllow,
    CreateFilter,
    DelAllow,
    DelDest,
    DelLink,
    DelRoute,
    DelService,
    Op,
    OpResult,
    Scope,
    SetDest,
    SetService,
    SetSysctl,
    StartSyncDaemon,
    StopSyncDaemon,
    Withdraw,
    changes_network,
)


class ShadowKernel:
    """A model data plane: what the kernel would hold had every operation been carried out."""

    def __init__(self, seed: LiveState | None = None) -> None:
        seed = seed or LiveState()
        self.services: dict[ServiceKey, LiveService] = {s.key: s for s in seed.services}
        self.links: dict[str, LiveLink] = {link.name: link for link in seed.links}
        self.routes: set[LiveRoute] = set(seed.routes)
        self.sysctls: dict[str, int | None] = dict(seed.sysctls)
        self.announced: set[str] = set(seed.announced)
        self.sync_daemons: set[SyncDaemon] = set(seed.sync_daemons)
        self.filter = seed.filter
        self._network: tuple[tuple[LiveLink, ...], tuple[LiveRoute, ...]] | None = None

    def read(self, scope: Scope = None) -> LiveState:
        services = self.services.values() if scope is None else (self.services[k] for k in scope
                                                                    if k in self.services)
        if self._network is None:
            self._network = (tuple(sorted(self.links.values(), key=lambda k: k.name)),
                             tuple(sorted(self.routes, key=lambda r: (r.table, r.dst, r.dev))))
        return LiveState(tuple(services), *self._network, tuple(sorted(self.sysctls.items())),
                         tuple(sorted(self.announced, key=ip_value)),
                         tuple(sorted(self.sync_daemons, key=lambda d: d.state)), self.filter)

    def apply(self, ops: Iterable[Op]) -> Iterator[OpResult]:
        for op in ops:
            if changes_network(op):
                self._network = None
            yield OpResult(op, self._apply(op))

    def _apply(self, op: Op) -> str | None:
        """The error the kernel would give, or None."""
        if isinstance(op, AddService | SetService):
            old = self.services.get(op.key)
            if (old is None) != isinstance(op, AddService):
                return "EEXIST" if old else "ESRCH"
            self.services[op.key] = LiveService(*op.key, op.scheduler, op.flags,
                                                old.real_servers if old else ())
        elif isinstance(op, DelService):
            return None if self.services.pop(op.key, None) else "ESRCH"
        elif isinstance(op, AddDest | SetDest | DelDest):
            return self._apply_dest(op)
        elif isinstance(op, AddLink):
            t = op.tunnel
            self.links[t.name] = LiveLink(t.name, "ipip", t.remote, t.local, 1, t.fou_port, True)
        elif isinstance(op, DelLink):
            self.links.pop(op.name, None)
            self.routes = {r for r in self.routes if r.dev != op.name}
        elif isinstance(op, AddRoute):
            self.routes.add(LiveRoute(op.dst, op.table, op.dev))
        elif isinstance(op, DelRoute):
            self.routes.discard(LiveRoute(op.dst, op.table, op.dev))
        elif isinstance(op, SetSysctl):
            self.sysctls[op.name] = op.value
        elif isinstance(op, Announce | Withdraw):
            return self._apply_announce(op)
        elif isinstance(op, StartSyncDaemon):
            self.sync_daemons.add(op.daemon)
        elif isinstance(op, StopSyncDaemon):
            self.sync_daemons.discard(op.daemon)
        elif isinstance(op, CreateFilter | AddAllow | ChangeAllow | DelAllow):
            self.filter = applied(self.filter, op, 1)
        return None

    def _apply_announce(self, op: Announce | Withdraw) -> str | None:
        if isinstance(op, Announce):
            if op.vip in self.announced:
                return "EEXIST"
            self.announced.add(op.vip)
            return None
        self.announced.discard(op.vip)  # a withdrawal of what is gone is done (kernel.GONE)
        return None

    def _apply_dest(self, op: AddDest | SetDest | DelDest) -> str | None:
        svc = self.services.get(op.key)
        if svc is None:
            return "ESRCH"
        others = tuple(r for r in svc.real_servers if r.address != op.address)
        present = len(others) != len(svc.real_servers)
        if isinstance(op, AddDest):
            if present:
                return "EEXIST"
            servers = (LiveRealServer(op.address, op.port, op.weight, forwarding=op.forwarding), *svc.real_servers)
        elif not present:
            return "ENOENT"
        elif isinstance(op, SetDest):
            servers = tuple(replace(r, weight=op.weight, forwarding=op.forwarding) if r.address == op.address else r
                            for r in svc.real_servers)
        else:
            servers = others
        self.services[op.key] = replace(svc, real_servers=servers)
        return None
