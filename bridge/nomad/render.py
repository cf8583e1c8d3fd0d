"""Job specs to HCL2 jobspecs (pure: no I/O). HCL rather than JSON so the rendered files can be read,
reviewed and run by hand with `nomad job run`; Nomad's parse API turns them into JSON for the rest.

Every management job carries the rack constraint: at most `max_per_rack` allocations per value of
`${meta.rack}`, so losing one rack (power, top-of-rack switch, reboot wave) never takes more than that
share of a service with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from bridge.nomad.spec import JobSpec

RACK_ATTRIBUTE = "${meta.rack}"
# One allocation at a time, healthy by its checks for a while before the next; a version that never gets
# healthy is rolled back.
UPDATE = [
    "max_parallel      = 1",
    'health_check      = "checks"',
    'min_healthy_time  = "5s"',
    'healthy_deadline  = "2m"',
    'progress_deadline = "5m"',
    "auto_revert       = true",
]
# A failed allocation is placed again elsewhere (still rack-distinct), backing off, for as long as it takes.
RESCHEDULE = [
    'delay          = "5s"',
    'delay_function = "exponential"',
    'max_delay      = "1m"',
    "unlimited      = true",
]


@dataclass(frozen=True)
class JobSource:
    """One job to send to one region: its HCL and the HCL variable file it is parsed with."""

    name: str
    region: str | None
    hcl: str
    origin: str
    variables: str = ""

    @property
    def label(self) -> str:
        return self.name if self.region is None else f"{self.name}@{self.region}"


def hcl_string(value: str) -> str:
    """A quoted HCL string. `${...}` passes through for Nomad's runtime interpolation (`${NOMAD_PORT_http}`,
    `${meta.rack}`); HCL's own template directives `%{...}` are escaped, so nothing in a spec is evaluated
    by the HCL parser."""
    return json.dumps(value).replace("%{", "%%{")


def hcl_literal(value: str) -> str:
    """A quoted HCL string taken literally, `${` included: for whole files (the agent's configuration)."""
    return hcl_string(value).replace("${", "$${")


def _list(values: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(hcl_string(v) for v in values) + "]"


def _block(header: str, lines: list[str]) -> list[str]:
    """`header { lines }`, the lines indented one level (nested blocks indent themselves)."""
    return [f"{header} {{", *(f"  {line}" if line else "" for line in lines), "}"]


def _rack_constraint(spec: JobSpec) -> list[str]:
    lines = [f"attribute = {hcl_string(RACK_ATTRIBUTE)}", 'operator  = "distinct_property"']
    if spec.max_per_rack > 1:
        lines.append(f'value     = "{spec.max_per_rack}"')
    return _block("constraint", lines)


def _network(spec: JobSpec) -> list[str]:
    ports = [
        f"port {hcl_string(label)} {{}}" if static is None else f"port {hcl_string(label)} {{ static = {static} }}"
        for label, static in spec.ports
    ]
    return _block("network", ports) if ports else []


def _service(spec: JobSpec) -> list[str]:
    if spec.service is None:
        return []
    service, check = spec.service, spec.service.check
    check_lines = [f"type     = {hcl_string(check.type)}"]
    if check.type == "http":
        check_lines.append(f"path     = {hcl_string(check.path)}")
    check_lines += [f"interval = {hcl_string(check.interval)}", f"timeout  = {hcl_string(check.timeout)}"]
    lines = [
        f"name     = {hcl_string(service.name)}",
        f"port     = {hcl_string(service.port)}",
        'provider = "consul"',
        f"tags     = {_list([*service.tags, 'rack=' + RACK_ATTRIBUTE])}",
        *_block("check", check_lines),
    ]
    return _block("service", lines)


def _task_config(spec: JobSpec) -> list[str]:
    if spec.driver == "docker":
        lines = [f"image = {hcl_string(spec.image or '')}"]
        if spec.command:
            lines += [f"command = {hcl_string(spec.command[0])}", f"args    = {_list(spec.command[1:])}"]
        if spec.ports:
            lines.append(f"ports = {_list([label for label, _ in spec.ports])}")
    else:
        lines = [f"command = {hcl_string(spec.command[0])}", f"args    = {_list(spec.command[1:])}"]
    return _block("config", lines)


def _task(spec: JobSpec) -> list[str]:
    lines = [f"driver = {hcl_string(spec.driver)}", *_task_config(spec)]
    if spec.env:
        lines += _block("env", [f"{name} = {hcl_string(value)}" for name, value in spec.env])
    lines += _block("resources", [f"cpu    = {spec.cpu}", f"memory = {spec.memory}"])
    return _block(f"task {hcl_string(spec.name)}", lines)


def render_job(spec: JobSpec, region: str | None = None) -> str:
    """The HCL2 jobspec of one management job, for one region (None: the client's region)."""
    job: list[str] = []
    if region is not None:
        job.append(f"region      = {hcl_string(region)}")
    job += [
        f"datacenters = {_list(spec.datacenters)}",
        'type        = "service"',
        "",
        *_rack_constraint(spec),
    ]
    if spec.node_class is not None:
        job += _block("constraint", ['attribute = "${node.class}"', f"value     = {hcl_string(spec.node_class)}"])
    job += _block("update", UPDATE)
    group = [
        f"count = {spec.count}",
        *_network(spec),
        *_block("reschedule", RESCHEDULE),
        *_service(spec),
        *_task(spec),
    ]
    job += _block(f"group {hcl_string(spec.name)}", group)
    header = f"# Rendered by maglev-bridge from {spec.source}; edit the spec, not this file.\n"
    return header + "\n".join(_block(f"job {hcl_string(spec.name)}", job)) + "\n"


def job_sources(spec: JobSpec, default_region: str | None) -> list[JobSource]:
    """One source per target region of the spec (the default region when it names none)."""
    regions = spec.regions or (default_region,)
    return [JobSource(spec.name, region, render_job(spec, region), spec.source) for region in regions]


def agent_variables(config_text: str, var_file_text: str = "", extra: dict[str, str] | None = None) -> str:
    """The agent job's HCL variable file: the operator's own variables, the agents' configuration and any
    `extra` string variables (the build's URL and checksum from the command line)."""
    parts = [var_file_text.rstrip("\n"), f"config = {hcl_literal(config_text)}"]
    parts += [f"{name} = {hcl_literal(value)}" for name, value in (extra or {}).items()]
    return "\n".join(p for p in parts if p) + "\n"
