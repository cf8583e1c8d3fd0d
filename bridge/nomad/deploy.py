"""Register a job and follow it until its allocations are healthy or it has failed, saying why.

Placement is judged from the registration's evaluation: when a group cannot be placed (most often the
rack constraint with more allocations than racks), waiting for the deployment would only end at its
progress deadline, so the failure is reported at once. Service jobs are then followed through their
deployment; system jobs get none in Nomad 1.6, so their allocations count as healthy when they run and
their Consul checks pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.nomad.client import Job, NomadClient
from bridge.nomad.placement import explain_failures

POLL = 0.5
Say = Callable[[str], None]
PassingAllocs = Callable[[list[str]], set[str]]
"""Service names to the IDs of the allocations whose Consul checks all pass."""

NOMAD_SERVICE_PREFIX = "_nomad-task-"


@dataclass
class Follow:
    client: NomadClient
    say: Say
    deadline: float
    passing: PassingAllocs | None = None

    def expired(self) -> bool:
        return time.monotonic() > self.deadline


def service_names(job: Job) -> list[str]:
    names = []
    for group in job.get("TaskGroups") or []:
        names += [s["Name"] for s in group.get("Services") or []]
        for task in group.get("Tasks") or []:
            names += [s["Name"] for s in task.get("Services") or []]
    return sorted(set(names))


def consul_passing(consul: Any) -> PassingAllocs:
    """Reads Consul's health of the services Nomad registered; Nomad names their IDs after the allocation."""

    def passing(names: list[str]) -> set[str]:
        found = set()
        for name in names:
            _, entries = consul.health.service(name)
            for entry in entries:
                service_id = str(entry["Service"]["ID"])
                if service_id.startswith(NOMAD_SERVICE_PREFIX) and all(
                    c["Status"] == "passing" for c in entry["Checks"]
                ):
                    found.add(service_id.removeprefix(NOMAD_SERVICE_PREFIX)[:36])
        return found

    return passing


def _wait_evaluation(follow: Follow, eval_id: str) -> dict[str, Any]:
    while True:
        evaluation = follow.client.evaluation(eval_id)
        if evaluation.get("Status") not in ("pending", "") or follow.expired():
            return evaluation
        time.sleep(POLL)


ARTIFACT_FAILED = "Failed Artifact Download"
CAUSES = ("Driver Failure", "Setup Failure", "Failed Validation", ARTIFACT_FAILED, "Template", "Killed", "Terminated")
"""Event types that say how the task itself ended; "Terminated" carries the exit code."""


def _latest(events: list[dict[str, Any]], wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """The newest event that `wanted`, by Nomad's timestamp (arrival order breaks ties)."""
    found = [e for e in events if wanted(e)]
    return max(reversed(found), key=lambda e: int(e.get("Time") or 0)) if found else None


def task_failure(alloc: dict[str, Any]) -> str:
    """Why a task failed, e.g. `web: Terminated: Exit Code: 3 (Not Restarting: Exceeded allowed attempts...)`.

    Chosen by kind, never by which event Nomad wrote last: the newest event that says how the task ended
    (its exit code, a driver or setup failure), then Nomad's verdict that failed it for good (the event
    marked FailsTask, e.g. "Not Restarting") when that is another event. Events about the allocation rather
    than the task ("Alloc Unhealthy", which the health watcher writes at about the same moment) are never
    chosen, so the same failure reads the same however the events interleave."""
    for task, state in sorted((alloc.get("TaskStates") or {}).items()):
        events = [e for e in state.get("Events") or [] if e.get("DisplayMessage")]
        cause = _latest(events, lambda e: e.get("Type") in CAUSES)
        verdict = _latest(events, lambda e: bool(e.get("FailsTask")))
        said = [e for e in (cause, verdict) if e is not None]
        if not state.get("Failed") or not said:
            continue
        first, *rest = said
        after = "".join(f" ({e['Type']}: {e['DisplayMessage']})" for e in rest if e is not first)
        return f"{task}: {first['Type']}: {first['DisplayMessage']}{after}"
    return str(alloc.get("ClientDescription") or alloc.get("ClientStatus"))


def _artifact_failure(alloc: dict[str, Any]) -> str | None:
    """Why a task that never started could not fetch its artifact (a checksum that differs, a URL that does
    not answer). Nomad retries the download under the restart policy and fails the allocation only after the
    last attempt, a minute or more later; the cause is already known."""
    for task, state in sorted((alloc.get("TaskStates") or {}).items()):
        events = state.get("Events") or []
        failures = [e for e in events if e.get("Type") == ARTIFACT_FAILED]
        if failures and not any(e.get("Type") == "Started" for e in events):
            return f"{task}: {ARTIFACT_FAILED}: {failures[-1].get('DisplayMessage')}"
    return None


def _report_failed(follow: Follow, label: str, allocs: list[dict[str, Any]]) -> bool:
    """Say why each failed or unhealthy allocation is; whether there was any."""
    bad = False
    for alloc in allocs:
        where = f"{label}: allocation {alloc['ID'][:8]} on {alloc['NodeName']}"
        if alloc["ClientStatus"] in ("failed", "lost"):
            follow.say(f"{where} {alloc['ClientStatus']}: {task_failure(alloc)}")
        elif (artifact := _artifact_failure(alloc)) is not None:
            follow.say(f"{where} cannot fetch its artifact: {artifact}")
        elif (alloc.get("DeploymentStatus") or {}).get("Healthy") is False:
            follow.say(f"{where} unhealthy: its checks did not pass within the healthy deadline")
        else:
            continue
        bad = True
    return bad


def _follow_deployment(follow: Follow, job: Job, deployment_id: str) -> bool:
    """Until the deployment succeeds, fails, or an allocation fails: Nomad would reschedule that one and
    fail the deployment only at its progress deadline, minutes later; the operator learns it now."""
    label, last = job["ID"], ""
    while True:
        deployment = follow.client.deployment(deployment_id)
        groups = deployment.get("TaskGroups") or {}
        healthy = sum(int(g.get("HealthyAllocs") or 0) for g in groups.values())
        desired = sum(int(g.get("DesiredTotal") or 0) for g in groups.values())
        status = deployment.get("Status")
        progress = f"{label}: deployment {status}: {healthy}/{desired} healthy"
        if progress != last:
            follow.say(progress)
            last = progress
        if status == "successful":
            return True
        allocs = follow.client.deployment_allocations(deployment_id)
        if status != "running" or follow.expired():
            reason = deployment.get("StatusDescription") if status != "running" else "timed out waiting"
            follow.say(f"{label}: deployment {deployment_id[:8]} did not succeed: {reason}")
            _report_failed(follow, label, allocs)
            return False
        if _report_failed(follow, label, allocs):
            follow.say(f"{label}: deployment {deployment_id[:8]} failing; Nomad reschedules the failed allocations")
            return False
        time.sleep(POLL)


def groups_down(live: list[dict[str, Any]], passing: set[str]) -> set[str]:
    """Task groups of several allocations none of which runs and passes its checks: with one allocation per
    director, every director of the data centre is down at once."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for alloc in live:
        groups.setdefault(alloc["TaskGroup"], []).append(alloc)
    return {name for name, allocs in groups.items()
            if len(allocs) > 1 and not any(a["ClientStatus"] == "running" and a["ID"] in passing for a in allocs)}


def _follow_allocations(follow: Follow, job: Job, version: int) -> bool:
    """Without a deployment: every allocation of this version running, and passing in Consul if known.

    Nomad 1.6 replaces a system job's allocations `stagger` apart without waiting for the new one to be healthy,
    so a stagger shorter than the time to healthy takes a whole group down for a moment; that is said once."""
    label, last = job["ID"], ""
    names = service_names(job)
    up: set[str] = set()
    while True:
        live = [a for a in follow.client.allocations(job["ID"]) if a.get("DesiredStatus") == "run"]
        allocs = [a for a in live if a.get("JobVersion") == version]
        older = len(live) - len(allocs)  # a rolling update replaces them one stagger at a time
        running = [a for a in allocs if a["ClientStatus"] == "running"]
        passing = follow.passing(names) if follow.passing is not None and names else None
        healthy = [a for a in running if passing is None or a["ID"] in passing]
        if passing is not None:
            down = groups_down(live, passing)
            for group in sorted(down & up):
                follow.say(f"{label}: no allocation of group '{group}' passes its checks: Nomad replaced the next one "
                           "before the last was healthy; raise the job's stagger above an allocation's time to healthy")
            up = {a["TaskGroup"] for a in live if a["ClientStatus"] == "running" and a["ID"] in passing}
        progress = f"{label}: {len(running)}/{len(allocs)} running, {len(healthy)} healthy"
        progress += f", {older} on an older version" if older else ""
        if passing is None:
            progress += " (health not checked: no consul section)" if names else ""
        if progress != last:
            follow.say(progress)
            last = progress
        if _report_failed(follow, label, allocs):
            return False
        if allocs and not older and len(healthy) == len(allocs):
            return True
        if follow.expired():
            follow.say(f"{label}: timed out waiting for {len(allocs) - len(healthy)} allocation(s) to be healthy")
            return False
        time.sleep(POLL)


def deploy_job(follow: Follow, job: Job) -> bool:
    """Register `job` and follow it; every line said is one plain sentence."""
    label = job["ID"]
    registered = follow.client.register(job)
    evaluation = _wait_evaluation(follow, registered["EvalID"])
    failures = explain_failures(job, evaluation.get("FailedTGAllocs"))
    for line in failures:
        follow.say(line)
    if failures:
        return False
    if evaluation.get("Status") != "complete":
        follow.say(f"{label}: evaluation {evaluation.get('Status')}: {evaluation.get('StatusDescription', '')}")
        return False
    current = follow.client.job(label) or {}
    if evaluation.get("DeploymentID"):
        return _follow_deployment(follow, job, str(evaluation["DeploymentID"]))
    return _follow_allocations(follow, job, int(current.get("Version") or 0))
