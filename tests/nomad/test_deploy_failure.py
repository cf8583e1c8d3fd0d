"""Pure tests: the line `deploy` prints for a failed task is chosen by what the events say, not by which one
Nomad wrote last. The event lists are shaped as Nomad 1.6 returns them in an allocation's TaskStates."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from bridge.nomad.deploy import task_failure

T0 = 1_764_600_000_000_000_000  # Nomad's TaskEvent.Time: Unix nanoseconds
EXCEEDED = 'Exceeded allowed attempts 2 in interval 30m0s and mode is "fail"'


def event(kind: str, seconds: float, display: str, **fields: Any) -> dict[str, Any]:
    """One TaskEvent as the allocation API returns it (the fields `nomad alloc status` reads)."""
    return {
        "Type": kind, "Time": T0 + int(seconds * 1e9), "Message": "", "DisplayMessage": display,
        "Details": fields.pop("Details", {}), "FailsTask": fields.pop("FailsTask", False),
        "RestartReason": fields.pop("RestartReason", ""), "DriverError": fields.pop("DriverError", ""),
        "ExitCode": fields.pop("ExitCode", 0), "Signal": 0, "KillReason": "", "KillTimeout": 0, "KillError": "",
        "StartDelay": fields.pop("StartDelay", 0), "SetupError": "", "ValidationError": "", "DownloadError": "",
        "FailedSibling": "", "DiskLimit": 0, "VaultError": "", "TaskSignal": "", "TaskSignalReason": "",
        "DriverMessage": "", "GenericSource": "",
    }  # fmt: skip


def terminated(seconds: float, code: int) -> dict[str, Any]:
    return event("Terminated", seconds, f"Exit Code: {code}", ExitCode=code,
                 Details={"exit_code": str(code), "signal": "0", "oom_killed": "false"})  # fmt: skip


def run_and_exit(start: float, code: int) -> list[dict[str, Any]]:
    return [event("Started", start, "Task started by client"), terminated(start + 0.1, code)]


# `exit 3` under restart {attempts = 2, mode = "fail"} in a service job with a deployment: three runs, the
# restart tracker's verdict, and the health watcher's event. The last two are written by different goroutines
# of the client at about the same moment, so either may come last.
CRASHING = [
    event("Received", 0, "Task received by client"),
    event("Task Setup", 0.01, "Building Task Directory"),
    *run_and_exit(0.1, 3),
    event("Restarting", 0.3, "Task restarting in 16.4s", StartDelay=16_400_000_000,
          RestartReason="Restart within policy", Details={"start_delay": "16400000000"}),
    *run_and_exit(16.8, 3),
    event("Restarting", 17.0, "Task restarting in 17.9s", StartDelay=17_900_000_000,
          RestartReason="Restart within policy", Details={"start_delay": "17900000000"}),
    *run_and_exit(35.0, 3),
]  # fmt: skip
NOT_RESTARTING = event("Not Restarting", 35.2, EXCEEDED, FailsTask=True, RestartReason=EXCEEDED,
                       Details={"fails_task": "true", "restart_reason": EXCEEDED})  # fmt: skip
UNHEALTHY = event("Alloc Unhealthy", 35.2, "Unhealthy because of failed task")


def failed_alloc(**task_events: list[dict[str, Any]]) -> dict[str, Any]:
    states = {task: {"State": "dead", "Failed": True, "Restarts": 2, "Events": events}
              for task, events in task_events.items()}  # fmt: skip
    return {"ID": "20773e0b-3c1f-7f1d-95a1-5f3e7b2c9a10", "NodeName": "nomad-c4", "ClientStatus": "failed",
            "ClientDescription": "Failed tasks", "TaskStates": states}  # fmt: skip


def test_a_task_that_keeps_exiting_reads_as_its_exit_code_and_the_restart_verdict() -> None:
    assert task_failure(failed_alloc(crashing=[*CRASHING, NOT_RESTARTING, UNHEALTHY])) == (
        f"crashing: Terminated: Exit Code: 3 (Not Restarting: {EXCEEDED})"
    )


@pytest.mark.parametrize("tail", list(itertools.permutations([CRASHING[-1], NOT_RESTARTING, UNHEALTHY])))
def test_the_same_failure_reads_the_same_whichever_event_arrived_last(tail: tuple[dict[str, Any], ...]) -> None:
    """The failing CI run saw "(Alloc Unhealthy: ...)" because that event happened to be written last."""
    events = [*CRASHING[:-1], *tail]
    assert task_failure(failed_alloc(crashing=events)) == task_failure(
        failed_alloc(crashing=[*CRASHING, NOT_RESTARTING, UNHEALTHY])
    )


def test_the_newest_exit_code_is_the_one_reported() -> None:
    events = [*CRASHING[:-1], terminated(35.1, 137), NOT_RESTARTING]
    assert task_failure(failed_alloc(crashing=events)).startswith("crashing: Terminated: Exit Code: 137 (")


def test_a_driver_failure_is_reported_with_the_verdict_and_without_the_health_event() -> None:
    error = 'failed to launch command with executor: exec: "/no/such/binary": no such file or directory'
    events = [
        event("Received", 0, "Task received by client"),
        event("Task Setup", 0.01, "Building Task Directory"),
        event("Driver Failure", 0.2, error, DriverError=error),
        UNHEALTHY,
        event("Not Restarting", 0.3, "Error was unrecoverable", FailsTask=True,
              RestartReason="Error was unrecoverable"),
    ]  # fmt: skip
    expected = f"web: Driver Failure: {error} (Not Restarting: Error was unrecoverable)"
    assert task_failure(failed_alloc(web=events)) == expected


def test_only_the_failed_task_is_named_and_an_alloc_without_events_falls_back_to_its_description() -> None:
    alloc = failed_alloc(crashing=[*CRASHING, NOT_RESTARTING])
    alloc["TaskStates"]["a-sidecar"] = {"State": "dead", "Failed": False, "Events": [UNHEALTHY]}
    assert task_failure(alloc).startswith("crashing: Terminated: Exit Code: 3")
    assert task_failure(failed_alloc(web=[])) == "Failed tasks"
