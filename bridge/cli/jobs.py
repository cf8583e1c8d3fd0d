"""`maglev-bridge jobs ...`: the management jobs (jobs/*.yaml) and, with --agent-config, the agent's own
system job (hcl/maglev-bridge.nomad.hcl), rendered, validated, planned, deployed and shown the same way.

Exit codes follow `nomad job plan`: 0 when all is well (plan: nothing would change), 1 when something
would change or failed (plan, validate, deploy), 2 on an error (bad spec, Nomad unreachable or refusing).

Nomad's client (python-nomad, requests) is imported where a command talks to Nomad, not with this module:
every `maglev-bridge` command registers these on its parser, and `plan` or `status` should not pay for it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.core.config import Config, ConfigError, NomadConfig, load_config
from bridge.nomad.artifact import artifact_variables
from bridge.nomad.plan import has_changes, plan_lines
from bridge.nomad.render import JobSource, agent_variables, job_sources
from bridge.nomad.spec import SpecError, load_specs

if TYPE_CHECKING:
    from bridge.nomad.client import Job, NomadClient
    from bridge.nomad.deploy import PassingAllocs

EXIT_OK = 0
EXIT_CHANGED = 1
EXIT_ERROR = 2
AGENT_JOB = "maglev-bridge"
AGENT_HCL = "hcl/maglev-bridge.nomad.hcl"


@dataclass
class Context:
    config: Config
    nomad: NomadConfig
    sources: list[JobSource]
    clients: dict[str | None, NomadClient]

    def client(self, region: str | None) -> NomadClient:
        from bridge.nomad.client import NomadClient

        if region not in self.clients:
            self.clients[region] = NomadClient(self.nomad, region)
        return self.clients[region]

    def parsed(self) -> Iterator[tuple[JobSource, NomadClient, Job]]:
        """Each job as Nomad parsed it, with the client of its region."""
        for source in self.sources:
            client = self.client(source.region)
            yield source, client, client.parse(source)

    def passing(self) -> PassingAllocs | None:
        if self.config.consul is None:
            return None
        from bridge.catalog.consul import make_client
        from bridge.nomad.deploy import consul_passing

        return consul_passing(make_client(self.config.consul))


def _agent_source(args: argparse.Namespace, nomad: NomadConfig) -> JobSource:
    """The agent's job, its `config` variable the agents' YAML (validated here, before any rollout)."""
    load_config(args.agent_config)
    try:
        config_text = Path(args.agent_config).read_text()
        var_text = Path(args.agent_var_file).read_text() if args.agent_var_file else ""
        hcl = Path(args.agent_job).read_text()
    except OSError as exc:
        raise ConfigError(f"{exc.filename}: cannot read: {exc.strerror}") from None
    artifact = artifact_variables(args.agent_artifact, args.agent_artifact_checksum, var_text)
    return JobSource(AGENT_JOB, nomad.region, hcl, args.agent_job, agent_variables(config_text, var_text, artifact))


def _context(args: argparse.Namespace, need_agent_hcl: bool = True) -> Context:
    config = load_config(args.config)
    nomad = config.nomad or NomadConfig()
    sources = [s for spec in load_specs(args.jobs_dir or nomad.jobs_dir) for s in job_sources(spec, nomad.region)]
    if args.agent_config:
        sources.append(_agent_source(args, nomad))
    elif args.agent:
        if need_agent_hcl:
            raise ConfigError("--agent-config: the agent's job needs the agents' configuration file")
        sources.append(JobSource(AGENT_JOB, nomad.region, "", args.agent_job))
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in sources})
        if unknown:
            raise SpecError(f"--only: no job named {', '.join(unknown)} (known: {', '.join(s.name for s in sources)})")
        sources = [s for s in sources if s.name in args.only]
    return Context(config, nomad, sources, {})


def cmd_render(args: argparse.Namespace) -> int:
    ctx = _context(args)
    for source in ctx.sources:
        stem = source.name if source.region is None else f"{source.name}.{source.region}"
        if args.out is None:
            print(source.hcl)
            if source.variables:
                print(f"# {stem}.vars.hcl (nomad job run -var-file=...):\n{source.variables}")
            continue
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.nomad.hcl").write_text(source.hcl)
        written = [f"{stem}.nomad.hcl"]
        if source.variables:
            (out / f"{stem}.vars.hcl").write_text(source.variables)
            written.append(f"{stem}.vars.hcl")
        print(f"{source.label}: wrote {', '.join(str(out / name) for name in written)}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    code = EXIT_OK
    for source, client, job in _context(args).parsed():
        result = client.validate(job)
        errors = [*(result.get("ValidationErrors") or [])] or ([result["Error"]] if result.get("Error") else [])
        print(f"{source.label}: {'invalid: ' + '; '.join(errors) if errors else 'valid'}")
        if result.get("Warnings"):
            print(f"{source.label}: warnings: {result['Warnings'].strip()}")
        code = EXIT_CHANGED if errors else code
    return code


def cmd_plan(args: argparse.Namespace) -> int:
    code = EXIT_OK
    for source, client, job in _context(args).parsed():
        plan = client.plan(job)
        print(f"{source.label}: {'would change' if has_changes(plan) else 'up to date'}")
        for line in plan_lines(job, plan):
            print(line)
        code = EXIT_CHANGED if has_changes(plan) else code
    return code


def cmd_deploy(args: argparse.Namespace) -> int:
    from bridge.nomad.client import NomadError
    from bridge.nomad.deploy import Follow, deploy_job

    ctx = _context(args)
    passing = ctx.passing()
    failed = errors = 0
    for source in ctx.sources:
        client = ctx.client(source.region)
        follow = Follow(client, lambda line: print(line, flush=True), time.monotonic() + args.timeout, passing)
        try:
            ok = deploy_job(follow, client.parse(source))
        except NomadError as exc:
            print(f"{source.label}: {exc}", file=sys.stderr)
            errors += 1
            continue
        failed += not ok
    return EXIT_ERROR if errors else EXIT_CHANGED if failed else EXIT_OK


def _health(alloc: dict[str, Any], passing: set[str] | None) -> str:
    healthy = (alloc.get("DeploymentStatus") or {}).get("Healthy")
    if healthy is None and passing is not None:
        healthy = alloc["ID"] in passing
    return "-" if healthy is None else "healthy" if healthy else "unhealthy"


def cmd_status(args: argparse.Namespace) -> int:
    from bridge.nomad.deploy import service_names

    ctx = _context(args, need_agent_hcl=False)
    probe = ctx.passing()
    for source in ctx.sources:
        client = ctx.client(source.region)
        job = client.job(source.name)
        if job is None:
            print(f"{source.label}: not registered")
            continue
        allocs = [a for a in client.allocations(source.name) if a.get("DesiredStatus") == "run"]
        passing = probe(service_names(job)) if probe else None
        state = "stopped" if job.get("Stop") else job.get("Status")
        print(f"{source.label}: {job['Type']} job, {state}, version {job.get('Version')}, {len(allocs)} allocation(s)")
        racks: dict[str, str] = {}
        for alloc in sorted(allocs, key=lambda a: (a["TaskGroup"], a["NodeName"])):
            node_id = alloc["NodeID"]
            if node_id not in racks:
                racks[node_id] = (client.node(node_id).get("Meta") or {}).get("rack", "-")
            print(
                f"  {alloc['ID'][:8]}  {alloc['TaskGroup']:<16} {alloc['NodeName']:<20} {racks[node_id]:<10} "
                f"{alloc['ClientStatus']:<8} {_health(alloc, passing)}"
            )
    return EXIT_OK


def _guarded(command: Any) -> Any:
    """Spec, configuration and Nomad errors end the command with one line and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        from bridge.nomad.client import NomadError

        try:
            code: int = command(args)
        except (SpecError, ConfigError, NomadError) as exc:
            print(f"maglev-bridge jobs {args.jobs_command}: {exc}", file=sys.stderr)
            return EXIT_ERROR
        return code

    return run


def add_jobs_commands(sub: Any) -> None:
    """Register `jobs render|validate|plan|deploy|status` on the main parser's subcommands."""
    jobs = sub.add_parser("jobs", help="Nomad: the management jobs and the agent's system job")
    commands = jobs.add_subparsers(dest="jobs_command", required=True)
    helps = {
        "render": (cmd_render, "print (or write with --out) the HCL2 jobspecs"),
        "validate": (cmd_validate, "parse and validate every job with Nomad"),
        "plan": (cmd_plan, "show what registering would change; exit 0 unchanged, 1 changed, 2 error"),
        "deploy": (cmd_deploy, "register and follow until healthy; explain placements that fail"),
        "status": (cmd_status, "each job's allocations: node, rack, state, health"),
    }
    for name, (command, text) in helps.items():
        p = commands.add_parser(name, help=text)
        p.add_argument("--config", help="YAML configuration; its nomad: section says where Nomad is")
        p.add_argument("--jobs-dir", help="directory of the job specs (default: nomad.jobs_dir)")
        p.add_argument("--only", action="append", metavar="NAME", help="only this job (repeatable)")
        p.add_argument("--agent", action="store_true", help="include the agent's system job")
        p.add_argument("--agent-config", metavar="FILE", help="the agents' configuration; includes the agent's job")
        p.add_argument("--agent-var-file", metavar="FILE", help="HCL variable file for the agent's job")
        p.add_argument("--agent-job", metavar="FILE", default=AGENT_HCL, help=f"the agent's job (default {AGENT_HCL})")
        p.add_argument("--agent-artifact", metavar="URL",
                       help="the agent's build (make dist) for the clients to fetch; sets the job's artifact_url")
        p.add_argument("--agent-artifact-checksum", metavar="SHA256",
                       help="sha256:<hex> of that build, or a local copy of it (or its .sha256 file) to compute it")
        if name == "render":
            p.add_argument("--out", metavar="DIR", help="write <job>.nomad.hcl (and <job>.vars.hcl) here")
        if name == "deploy":
            p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait per job (default 300)")
        p.set_defaults(func=_guarded(command))
