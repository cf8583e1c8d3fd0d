"""Nomad's plan answer: whether the job in Nomad differs from the spec, and the difference in the
`nomad job plan` notation (+ added, - deleted, +/- edited), unchanged fields left out."""

from __future__ import annotations

from typing import Any

from bridge.nomad.placement import explain_failures

MARKS = {"Added": "+", "Deleted": "-", "Edited": "+/-"}


def has_changes(plan: dict[str, Any]) -> bool:
    """Registering would change the job (new, edited, or stopped by hand). Allocations that cannot be
    placed are not a change: registering again would not place them either."""
    return str((plan.get("Diff") or {}).get("Type", "None")) != "None"


def _field(field: dict[str, Any]) -> str:
    kind, old, new = field["Type"], field.get("Old", ""), field.get("New", "")
    value = f"{new!r}" if kind == "Added" else f"{old!r}" if kind == "Deleted" else f"{old!r} => {new!r}"
    notes = f" ({', '.join(field['Annotations'])})" if field.get("Annotations") else ""
    return f"{MARKS[kind]} {field['Name']}: {value}{notes}"


def _changed(items: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [item for item in items or [] if item.get("Type") in MARKS]


def _body(diff: dict[str, Any]) -> list[str]:
    lines = [_field(f) for f in _changed(diff.get("Fields"))]
    for obj in _changed(diff.get("Objects")):
        lines += [f"{MARKS[obj['Type']]} {obj['Name']} {{", *(f"  {line}" for line in _body(obj)), "}"]
    return lines


def _group(group: dict[str, Any]) -> list[str]:
    updates = ", ".join(f"{n} {kind}" for kind, n in sorted((group.get("Updates") or {}).items()) if n)
    lines = _body(group)
    for task in _changed(group.get("Tasks")):
        lines += [f"{MARKS[task['Type']]} Task: {task['Name']!r}", *(f"  {line}" for line in _body(task))]
    mark = MARKS.get(group.get("Type", "None"), " ")
    head = f"{mark} Task Group: {group['Name']!r}" + (f" ({updates})" if updates else "")
    return [head, *(f"  {line}" for line in lines)] if lines or updates else []


def diff_lines(diff: dict[str, Any]) -> list[str]:
    """The difference, indented like `nomad job plan` prints it; nothing when nothing changes."""
    if diff.get("Type") not in MARKS:
        return []
    if diff["Type"] == "Added":  # every field would be new: the groups and what they create say enough
        lines = [
            _group({"Name": g["Name"], "Type": "Added", "Updates": g.get("Updates")})[0]
            for g in diff.get("TaskGroups") or []
        ]
    else:
        lines = _body(diff)
        for group in diff.get("TaskGroups") or []:
            lines += _group(group)
    return [f"{MARKS[diff['Type']]} Job: {diff.get('ID')!r}", *(f"  {line}" for line in lines)]


def plan_lines(job: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """What `jobs plan` prints for one job: the difference, then placements that would fail."""
    lines = diff_lines(plan.get("Diff") or {}) or [f"  {job['ID']}: no change"]
    lines += [f"  would not place: {line}" for line in explain_failures(job, plan.get("FailedTGAllocs"))]
    if plan.get("Warnings"):
        lines.append(f"  warnings: {plan['Warnings'].strip()}")
    return lines
