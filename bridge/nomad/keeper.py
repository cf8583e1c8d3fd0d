"""Keeps the management jobs as their specs say: a job stopped by hand, purged, or edited in Nomad is
registered again from its spec. Meant to run on the agent's scheduler every `nomad.keep_interval`.

Only a difference between the spec and the job in Nomad triggers a registration: allocations Nomad cannot
place (more allocations than racks) are left to Nomad's blocked evaluation, which places them when a rack
frees up, instead of being re-registered every interval.
"""

from __future__ import annotations

from bridge.core.config import Config, NomadConfig
from bridge.nomad.client import NomadClient, NomadError
from bridge.nomad.plan import has_changes
from bridge.nomad.render import JobSource, job_sources
from bridge.nomad.spec import SpecError, load_specs


def _why(current: dict[str, object] | None) -> str:
    if current is None:
        return "missing from Nomad"
    if current.get("Stop"):
        return "stopped by hand"
    return "differs from its spec"


def keep_job(client: NomadClient, source: JobSource) -> str | None:
    """Register the job again if it drifted; a log line saying so, None when it was as it should be."""
    job = client.parse(source)
    if not has_changes(client.plan(job)):
        return None
    why = _why(client.job(job["ID"]))
    registered = client.register(job)
    return f"{source.label}: {why}; registered again (evaluation {registered['EvalID'][:8]})"


def keep_jobs(config: Config) -> list[str]:
    """Re-plan every job in `nomad.jobs_dir`; register again those that drifted or were stopped by hand.

    Never raises for a bad spec or an unreachable Nomad: the lines say what went wrong, and the next
    interval tries again.
    """
    nomad_config = config.nomad or NomadConfig()
    try:
        specs = load_specs(nomad_config.jobs_dir)
    except SpecError as exc:
        return [f"jobs not kept: {exc}"]
    lines: list[str] = []
    clients: dict[str | None, NomadClient] = {}
    for spec in specs:
        for source in job_sources(spec, nomad_config.region):
            try:
                client = clients.setdefault(source.region, NomadClient(nomad_config, source.region))
                line = keep_job(client, source)
            except NomadError as exc:
                line = f"{source.label}: not kept: {exc}"
            if line is not None:
                lines.append(line)
    return lines
