"""Nomad's placement metrics (an evaluation's or a plan's FailedTGAllocs) as one plain line per task group.

The scheduler's own words ("distinct_property: ${meta.rack}=rack-a used by 1 allocs": 2) are exact but
read like a debugger; an operator wants to know which rule stopped the placement and what would unblock
it. The rack constraint gets its own wording because it is the rule this project adds to every job.
"""

from __future__ import annotations

import re
from typing import Any

from bridge.nomad.render import RACK_ATTRIBUTE

_DISTINCT = re.compile(r"^distinct_property: (?P<attribute>.+)=(?P<value>.*) used by (?P<used>\d+) allocs$")


def _limit(job: dict[str, Any], group: str, attribute: str) -> int:
    """The distinct_property limit on `attribute` (job or group level; no value means 1)."""
    constraints = list(job.get("Constraints") or [])
    for tg in job.get("TaskGroups") or []:
        if tg.get("Name") == group:
            constraints += tg.get("Constraints") or []
    for c in constraints:
        if c.get("Operand") == "distinct_property" and c.get("LTarget") == attribute:
            return int(c.get("RTarget") or 1)
    return 1


def _group_count(job: dict[str, Any], group: str) -> int | None:
    for tg in job.get("TaskGroups") or []:
        if tg.get("Name") == group:
            return int(tg["Count"]) if tg.get("Count") is not None else None
    return None


def _distinct_reasons(job: dict[str, Any], group: str, filtered: dict[str, int]) -> tuple[list[str], dict[str, int]]:
    """Reasons for the distinct_property filters; the other constraint filters are returned untouched."""
    full: dict[str, list[str]] = {}
    others: dict[str, int] = {}
    for key, nodes in filtered.items():
        match = _DISTINCT.match(key)
        if match is None:
            others[key] = nodes
        else:
            full.setdefault(match["attribute"], []).append(match["value"])
    reasons = []
    for attribute, values in sorted(full.items()):
        limit = _limit(job, group, attribute)
        per = "rack" if attribute == RACK_ATTRIBUTE else f"value of {attribute}"
        name = "rack constraint" if attribute == RACK_ATTRIBUTE else "constraint"
        reasons.append(
            f"{name} distinct_property {attribute} allows {limit} per {per} and every {per} with a "
            f"usable node already has {limit} ({', '.join(sorted(values))})"
        )
    return reasons, others


def explain_group(job: dict[str, Any], group: str, metric: dict[str, Any]) -> str:
    failed = int(metric.get("CoalescedFailures") or 0) + 1
    count = _group_count(job, group)
    wanted = f"{failed} of {count}" if count is not None else str(failed)
    reasons, others = _distinct_reasons(job, group, dict(metric.get("ConstraintFiltered") or {}))
    reasons += [f"{nodes} node(s) filtered by {key}" for key, nodes in sorted(others.items())]
    exhausted = metric.get("DimensionExhausted") or {}
    reasons += [f"{nodes} node(s) out of {dim}" for dim, nodes in sorted(exhausted.items())]
    if not metric.get("NodesEvaluated"):
        available = metric.get("NodesAvailable") or {}
        reasons.append(f"no ready node in the job's datacenters (ready per datacenter: {available or 'none'})")
    reasons = reasons or [f"{metric.get('NodesEvaluated')} node(s) evaluated, none fit"]
    return f"{job['ID']}: {wanted} allocation(s) of group {group!r} not placed: {'; '.join(reasons)}"


def _targeted_away(job: dict[str, Any], metric: dict[str, Any]) -> bool:
    """A system job's constraints choose its nodes: nodes they filter out are not failures, nodes out of
    resources are."""
    return job.get("Type") == "system" and not metric.get("NodesExhausted") and not metric.get("DimensionExhausted")


def explain_failures(job: dict[str, Any], failed_tg_allocs: dict[str, Any] | None) -> list[str]:
    """One line per task group that could not be placed."""
    return [
        explain_group(job, group, metric)
        for group, metric in sorted((failed_tg_allocs or {}).items())
        if not _targeted_away(job, metric)
    ]
