"""The backend role's desired state kept per service, as the director's `DesiredBook`: a change to one of the
node's instances recomputes that service's claims, not the node's. Pure: `update` with any snapshot gives
what a fresh book gives for that one snapshot, which the unit tests check on random histories; `apply --role
backend` uses a fresh one.

Measured with bench/backend_watch.py (c), per change of one instance, from Consul's own answers: computed
afresh from the whole node (as the backend did before, most of it a whole `compute_desired` made for its
rejections alone) 1.4 ms of CPU for a node of 50 tagged instances and 14.5 ms for 500; kept here, 0.17 and
1.6 ms. Parsing Consul's answer, which carries the whole node whatever changed, costs 0.45 and 5.3 ms on top.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.core.config import Config
from bridge.core.desired import DesiredBook, claims_of_node
from bridge.core.model import Instance, Rejection, Snapshot


@dataclass(frozen=True)
class NodeDesired:
    vips: frozenset[str]
    """Every VIP the node's instances validly claim, critical ones included (their connections drain)."""
    failures: dict[str, str]
    """Services whose claims could not be computed (a bug, not bad data), with why."""
    rejected: tuple[Rejection, ...]
    """The rejected claims of the node's own instances."""
    underlays: frozenset[int] = frozenset({4})
    """The address families (4, 6) of the node's instances that claim a VIP: how `gue` directors reach this
    node, GUE over IPv4 or over IPv6, so what it must receive (bridge/dataplane/backend.py)."""


class NodeBook:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._desired = DesiredBook(config)
        self._claims: dict[str, tuple[tuple[Instance, ...], frozenset[str], dict[str, str]]] = {}
        """Service -> its instances at the last update, the VIPs they claim and why they could not be computed."""

    def update(self, snapshot: Snapshot) -> NodeDesired:
        node = self.config.node_name
        claims = {}
        for name, instances in snapshot.by_service().items():
            kept = self._claims.get(name)
            if kept is None or kept[0] != instances:
                found, failures = claims_of_node(Snapshot(instances), self.config, node)
                kept = (instances, frozenset(claim.vip for claim in found), failures)
            claims[name] = kept
        self._claims = claims
        self._desired.update(snapshot)
        own = {i.instance_id for i in snapshot.instances if i.node == node}
        rejected = tuple(r for r in self._desired.desired("0.0.0.0").rejected if r.instance in own)
        vip_tag = self.config.tag_prefix + ".vip="
        underlays = frozenset(6 if ":" in i.address else 4 for i in snapshot.instances
                              if i.node == node and any(t.startswith(vip_tag) for t in i.tags))
        return NodeDesired(frozenset().union(*(vips for _, vips, _ in claims.values())),
                           {name: why for _, _, failed in claims.values() for name, why in failed.items()}, rejected,
                           underlays)
