"""What this director announces to the routers, as routes in the announce table that BIRD learns. Pure.

The rules, and why:

* A VIP is announced only by a pass that may announce: a full pass (the director's first one included), or
  any pass once a full pass has been applied without failures. A director that boots, or starts while the
  catalog is unreachable, therefore never attracts traffic before its tables are right.
* Announcements are the last operations of a pass and are skipped when an earlier operation of that pass
  failed (`reconcile.director_pass`): a half-applied director is not announced.
* A VIP that no longer has any claim (or every VIP, in maintenance) is withdrawn by the first operation of
  the pass, before anything else, and so long before its IPVS service is deleted: the service drains for
  `drain_timeout` while the routers move the flows away, and whatever still arrives is served.
* Withdrawals are never gated: a VIP already announced (by this agent before a restart) stays announced
  while it has claims, so a restart changes nothing on the router.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from bridge.core.addr import ip_value
from bridge.core.model import DesiredState
from bridge.core.ops import Announce, AnnounceOp, Withdraw


@dataclass(frozen=True)
class Announcing:
    """The announcement decision of one pass."""

    table: int
    vips: tuple[str, ...]
    """What this director should announce now."""
    may_add: bool
    """Whether this pass may add announcements (the full-pass gate)."""


def announcing(desired: DesiredState, table: int, *, maintenance: bool, full_pass: bool,
               gate_open: bool) -> Announcing:
    """`gate_open`: a full pass has already been applied without failures since the agent started."""
    vips = () if maintenance else desired.vip_routes
    return Announcing(table, vips, full_pass or gate_open)


def announcement_ops(decision: Announcing, live: Collection[str]) -> tuple[list[AnnounceOp], list[AnnounceOp]]:
    """(withdrawals, which go first in the pass; announcements, which go last)."""
    wanted = set(decision.vips)
    gone = sorted((vip for vip in live if vip not in wanted), key=ip_value)
    withdraws: list[AnnounceOp] = [Withdraw(vip, decision.table) for vip in gone]
    if not decision.may_add:
        return withdraws, []
    present = set(live)
    return withdraws, [Announce(vip, decision.table) for vip in decision.vips if vip not in present]
