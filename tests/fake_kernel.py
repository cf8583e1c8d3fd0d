"""An in-process stand-in for the kernel's IPVS list semantics, for fast unit tests of the planner only.

It models exactly what the planner relies on and the real kernel tests confirm: a new real server goes to
the head of the list; last_weight is set on add and on edits to a non-zero weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from bridge.dataplane.diff import dest_id
from bridge.dataplane.ops import (
    AddDest,
    AddLink,
    AddRoute,
    AddService,
    DelDest,
    DelLink,
    DelRoute,
    DelService,
    Op,
    SetDest,
    SetService,
)
from bridge.dataplane.state import LiveLink, LiveRealServer, LiveRoute, LiveService, LiveState


@dataclass
class FakeKernel:
    services: dict[tuple[str, int, str], LiveService] = field(default_factory=dict)
    links: dict[str, LiveLink] = field(default_factory=dict)
    routes: set[LiveRoute] = field(default_factory=set)
    last_weight: dict[str, int] = field(default_factory=dict)
    ops_run: int = 0

    def read(self) -> LiveState:
        return LiveState(tuple(self.services.values()), tuple(sorted(self.links.values(), key=lambda k: k.name)),
                         tuple(sorted(self.routes, key=lambda r: (r.table, r.dst))))

    def apply(self, ops: tuple[Op, ...]) -> None:
        for op in ops:
            self.ops_run += 1
            self._apply(op)

    def _apply(self, op: Op) -> None:
        if isinstance(op, AddService | SetService):
            old = self.services.get(op.key)
            self.services[op.key] = LiveService(op.key[0], op.key[1], op.key[2], op.scheduler, op.flags,
                                                old.real_servers if old else ())
        elif isinstance(op, DelService):
            del self.services[op.key]
        elif isinstance(op, AddDest | SetDest | DelDest):
            svc = self.services[op.key]
            rs = [r for r in svc.real_servers if r.address != op.address]
            ident = dest_id(op.key, op.address, op.port)
            if isinstance(op, AddDest):
                assert len(rs) == len(svc.real_servers), f"duplicate add {ident}"
                rs.insert(0, LiveRealServer(op.address, op.port, op.weight))
                self.last_weight[ident] = op.weight
            elif isinstance(op, SetDest):
                rs = [replace(r, weight=op.weight) if r.address == op.address else r for r in svc.real_servers]
                if op.weight:
                    self.last_weight[ident] = op.weight
            else:
                self.last_weight.pop(ident, None)
            self.services[op.key] = replace(svc, real_servers=tuple(rs))
        elif isinstance(op, AddLink):
            t = op.tunnel
            self.links[t.name] = LiveLink(t.name, "ipip", t.remote, t.local, 1, t.fou_port, True)
        elif isinstance(op, DelLink):
            del self.links[op.name]
            self.routes = {r for r in self.routes if r.dev != op.name}
        elif isinstance(op, AddRoute):
            self.routes.add(LiveRoute(op.dst, op.table, op.dev))
        elif isinstance(op, DelRoute):
            self.routes.discard(LiveRoute(op.dst, op.table, op.dev))

    def table_state(self) -> list[tuple[str, tuple[tuple[str, int, int], ...]]]:
        """What ip_vs_mh builds its table from: list order and each real server's last_weight."""
        return [
            (f"{k}", tuple((r.address, r.weight, self.last_weight[dest_id(k, r.address, r.port)])
                           for r in s.real_servers))
            for k, s in sorted(self.services.items())
        ]
