"""Following a system job's rolling update (no Nomad deployment in 1.6), with a stand-in for the Nomad client:
the moments Nomad's `stagger` alone decides are told apart from a healthy roll."""

from __future__ import annotations

import time
from typing import Any

import pytest

from bridge.nomad import deploy
from bridge.nomad.deploy import Follow

JOB = {"ID": "maglev-bridge", "Type": "system", "TaskGroups": [{"Name": "director", "Services": [{"Name": "mb"}]}]}


def alloc(alloc_id: str, version: int, status: str = "running") -> dict[str, Any]:
    return {"ID": alloc_id, "JobVersion": version, "ClientStatus": status, "DesiredStatus": "run",
            "TaskGroup": "director", "NodeName": f"node-{alloc_id}"}  # fmt: skip


class Rolling:
    """Each poll shows the next snapshot of (allocations, IDs passing in Consul)."""

    def __init__(self, snapshots: list[tuple[list[dict[str, Any]], set[str]]]) -> None:
        self.snapshots = snapshots
        self.at = -1

    def allocations(self, job_id: str) -> list[dict[str, Any]]:
        self.at = min(self.at + 1, len(self.snapshots) - 1)
        return self.snapshots[self.at][0]

    def passing(self, names: list[str]) -> set[str]:
        return self.snapshots[self.at][1]


def follow(snapshots: list[tuple[list[dict[str, Any]], set[str]]], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(deploy, "POLL", 0)
    said: list[str] = []
    rolling = Rolling(snapshots)
    f = Follow(rolling, said.append, time.monotonic() + 10, rolling.passing)  # type: ignore[arg-type]
    assert deploy._follow_allocations(f, JOB, 1)
    return said


DOWN = ("maglev-bridge: no allocation of group 'director' passes its checks: Nomad replaced the next one before the "
        "last was healthy; raise the job's stagger above an allocation's time to healthy")  # fmt: skip


def test_a_roll_whose_stagger_outran_the_new_directors_health_says_once_that_every_director_was_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    said = follow([
        ([alloc("a1", 0), alloc("a2", 0)], {"a1", "a2"}),
        ([alloc("b1", 1, "pending"), alloc("a2", 0)], {"a2"}),
        ([alloc("b1", 1), alloc("b2", 1, "pending")], set()),  # a2 stopped before b1 passed
        ([alloc("b1", 1), alloc("b2", 1, "pending")], set()),
        ([alloc("b1", 1), alloc("b2", 1)], {"b1", "b2"}),
    ], monkeypatch)  # fmt: skip
    assert said.count(DOWN) == 1
    assert said[-1] == "maglev-bridge: 2/2 running, 2 healthy"


def test_a_roll_that_keeps_one_director_passing_and_a_first_registration_say_nothing_of_the_kind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rolled = follow([
        ([alloc("a1", 0), alloc("a2", 0)], {"a1", "a2"}),
        ([alloc("b1", 1, "pending"), alloc("a2", 0)], {"a2"}),
        ([alloc("b1", 1), alloc("a2", 0)], {"b1", "a2"}),
        ([alloc("b1", 1), alloc("b2", 1, "pending")], {"b1"}),
        ([alloc("b1", 1), alloc("b2", 1)], {"b1", "b2"}),
    ], monkeypatch)  # fmt: skip
    first = follow([
        ([alloc("b1", 1, "pending")], set()),
        ([alloc("b1", 1, "pending"), alloc("b2", 1, "pending")], set()),
        ([alloc("b1", 1), alloc("b2", 1)], {"b1", "b2"}),
    ], monkeypatch)  # fmt: skip
    assert DOWN not in rolled + first
    assert any(line.endswith(", 1 on an older version") for line in rolled)
