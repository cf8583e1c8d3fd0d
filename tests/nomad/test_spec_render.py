"""Pure tests: job specs are validated with errors naming file and key; rendering always carries the rack
constraint, resources, the service check and the reschedule policy; placement failures read as one line."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.cli.jobs import AGENT_HCL, AGENT_JOB
from bridge.core.config import ConfigError
from bridge.nomad.artifact import artifact_checksum, artifact_variables
from bridge.nomad.placement import explain_failures
from bridge.nomad.plan import diff_lines, has_changes
from bridge.nomad.render import agent_variables, hcl_string, job_sources, render_job
from bridge.nomad.spec import JobSpec, SpecError, load_spec, load_specs, parse_spec

REPO = Path(__file__).resolve().parents[2]

GOOD: dict[str, Any] = {
    "name": "web",
    "driver": "raw_exec",
    "command": "/usr/bin/python3 -m http.server ${NOMAD_PORT_http}",
    "cpu": 100,
    "memory": 64,
    "ports": {"http": "dynamic"},
    "service": {"port": "http", "check": {"type": "http", "path": "/", "interval": "5s"}},
}


def spec(**changes: Any) -> JobSpec:
    return parse_spec({**GOOD, **changes}, "jobs/web.yaml")


def spec_error(**changes: Any) -> str:
    raw = {k: v for k, v in {**GOOD, **changes}.items() if v is not None}
    with pytest.raises(SpecError) as err:
        parse_spec(raw, "jobs/web.yaml")
    return str(err.value)


# -- specs -----------------------------------------------------------------------------------------


def test_shipped_specs_load_and_include_the_reboot_manager() -> None:
    specs = {s.name: s for s in load_specs(REPO / "jobs")}
    assert "reboot-manager" in specs and len(specs) >= 2
    manager = specs["reboot-manager"]
    assert manager.driver == "raw_exec" and manager.max_per_rack == 1
    assert manager.service is not None and manager.service.check.type == "http"


def test_spec_defaults_count_one_one_per_rack_all_datacenters_and_the_only_port_for_the_service() -> None:
    s = spec()
    assert (s.count, s.max_per_rack, s.datacenters, s.regions) == (1, 1, ("*",), ())
    assert s.command == ("/usr/bin/python3", "-m", "http.server", "${NOMAD_PORT_http}")
    assert s.service is not None and (s.service.name, s.service.port) == ("web", "http")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"replicas": 3}, "jobs/web.yaml: replicas: unknown key; known keys are name, driver"),
        ({"count": 0}, "jobs/web.yaml: count: expected an integer from 1 to 1000, got 0"),
        ({"count": "3"}, "jobs/web.yaml: count: expected an integer from 1 to 1000, got '3'"),
        ({"memory": None}, "jobs/web.yaml: memory: missing (required)"),
        ({"ports": {"http": 70000}}, "jobs/web.yaml: ports.http: expected a port number from 1 to 65535 or 'dynamic'"),
        ({"ports": {"Http!": "dynamic"}}, "jobs/web.yaml: ports.Http!: port label 'Http!' must match"),
        ({"service": {"port": "grpc"}}, "jobs/web.yaml: service.port: 'grpc' is not one of the job's ports (http)"),
        ({"service": {"check": {"type": "script"}}}, "jobs/web.yaml: service.check.type: expected one of http, tcp"),
        ({"service": {"check": {"interval": "5"}}}, "jobs/web.yaml: service.check.interval: '5' does not match"),
        ({"service": {"check": {"path": "health"}}}, "jobs/web.yaml: service.check.path: 'health' does not match"),
        ({"driver": "java"}, "jobs/web.yaml: driver: expected one of raw_exec, exec, docker, got 'java'"),
        ({"image": "nginx"}, "jobs/web.yaml: image: only the docker driver runs images"),
        ({"command": None}, "jobs/web.yaml: command: missing (required with driver raw_exec)"),
        ({"driver": "docker", "command": None}, "jobs/web.yaml: image: missing (required with driver docker)"),
        ({"name": "Web_1"}, "jobs/web.yaml: name: 'Web_1' does not match"),
        ({"max_per_rack": 0}, "jobs/web.yaml: max_per_rack: expected an integer from 1 to 1000, got 0"),
        ({"datacenters": "dc1"}, "jobs/web.yaml: datacenters: expected a list of non-empty strings, got 'dc1'"),
    ],
)
def test_spec_errors_name_the_file_and_the_key(changes: dict[str, Any], message: str) -> None:
    assert spec_error(**changes).startswith(message)


def test_spec_file_must_be_named_after_its_job(tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    with pytest.raises(SpecError, match=r"other.yaml: name: 'web' differs from the file name"):
        load_spec(path)


def test_spec_that_is_not_a_mapping_or_not_yaml_is_refused(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match=r"web.yaml: spec: expected a mapping of keys, got list"):
        load_specs(tmp_path)
    (tmp_path / "web.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"web.yaml: not valid YAML"):
        load_specs(tmp_path)


# -- rendering -------------------------------------------------------------------------------------


def test_render_always_emits_the_rack_constraint_without_value_for_one_per_rack() -> None:
    hcl = render_job(spec())
    assert 'constraint {\n    attribute = "${meta.rack}"\n    operator  = "distinct_property"\n  }' in hcl
    assert "value" not in hcl.split("constraint {", 1)[1].split("}", 1)[0]


def test_render_sets_the_rack_limit_when_more_than_one_per_rack_is_allowed() -> None:
    hcl = render_job(spec(max_per_rack=2, count=5))
    assert re.search(r'attribute = "\$\{meta.rack\}"\n\s+operator  = "distinct_property"\n\s+value     = "2"', hcl)
    assert "count = 5" in hcl


def test_render_has_resources_service_check_reschedule_and_update() -> None:
    hcl = render_job(spec(node_class="app", env={"MODE": "maintenance"}), region="eu")
    for fragment in [
        'region      = "eu"',
        'datacenters = ["*"]',
        'attribute = "${node.class}"',
        'port "http" {}',
        "cpu    = 100",
        "memory = 64",
        'name     = "web"',
        'tags     = ["rack=${meta.rack}"]',
        'type     = "http"',
        'path     = "/"',
        'interval = "5s"',
        "reschedule {",
        "unlimited      = true",
        'health_check      = "checks"',
        'MODE = "maintenance"',
        'args    = ["-m", "http.server", "${NOMAD_PORT_http}"]',
    ]:
        assert fragment in hcl, fragment


def test_render_static_port_and_docker_image() -> None:
    hcl = render_job(spec(driver="docker", image="nginx:1.25", command=None, ports={"http": 8080}))
    assert 'port "http" { static = 8080 }' in hcl
    assert 'image = "nginx:1.25"' in hcl and 'ports = ["http"]' in hcl and "command" not in hcl


def test_one_source_per_region_of_the_spec_else_the_default_region() -> None:
    assert [s.label for s in job_sources(spec(regions=["eu", "us"]), "global")] == ["web@eu", "web@us"]
    assert [s.region for s in job_sources(spec(), None)] == [None]


def test_hcl_strings_keep_nomad_interpolation_and_escape_hcl_directives() -> None:
    assert hcl_string('say "hi" ${NOMAD_PORT_http} %{ if x }') == '"say \\"hi\\" ${NOMAD_PORT_http} %%{ if x }"'


def test_agent_variables_carry_the_configuration_literally() -> None:
    text = agent_variables('consul:\n  token_file: "${HOME}/t"\n', 'venv = "/opt/v"\n')
    assert text == 'venv = "/opt/v"\nconfig = "consul:\\n  token_file: \\"$${HOME}/t\\"\\n"\n'


def test_agent_variables_add_the_builds_url_and_checksum_after_the_configuration() -> None:
    text = agent_variables("vip_cidrs: []\n", 'stagger = "5s"\n', {"artifact_url": "https://b/m.pyz",
                                                                  "artifact_checksum": "sha256:ab"})
    assert text.splitlines() == ['stagger = "5s"', 'config = "vip_cidrs: []\\n"', 'artifact_url = "https://b/m.pyz"',
                                 'artifact_checksum = "sha256:ab"']  # fmt: skip


DIGEST = hashlib.sha256(b"build").hexdigest()


def test_artifact_checksum_is_given_or_computed_from_a_local_copy_or_its_sha256_file(tmp_path: Path) -> None:
    build = tmp_path / "maglev-bridge-0.1.0-cp311-linux_x86_64.pyz"
    build.write_bytes(b"build")
    (tmp_path / f"{build.name}.sha256").write_text(f"{DIGEST}  {build.name}\n")
    assert artifact_checksum(f"sha256:{DIGEST.upper()}") == f"sha256:{DIGEST}"
    assert artifact_checksum(str(build)) == f"sha256:{DIGEST}"
    assert artifact_checksum(f"{build}.sha256") == f"sha256:{DIGEST}"
    assert artifact_variables(None, None, "") == {}
    assert artifact_variables("http://127.0.0.1/b.pyz", str(build), 'stagger = "5s"') == {
        "artifact_url": "http://127.0.0.1/b.pyz", "artifact_checksum": f"sha256:{DIGEST}"}  # fmt: skip


@pytest.mark.parametrize(
    ("url", "checksum", "var_file", "message"),
    [
        ("http://b/m.pyz", None, "", "--agent-artifact-checksum: --agent-artifact needs the build's checksum"),
        ("http://b/m.pyz", "sha256:12", "", "--agent-artifact-checksum: 'sha256:12': expected sha256: and 64 hex"),
        ("http://b/m.pyz", "/nonexistent/m.pyz", "", "--agent-artifact-checksum: /nonexistent/m.pyz: cannot read"),
        (None, f"sha256:{DIGEST}", "", "--agent-artifact-checksum: only with --agent-artifact URL"),
        ("http://b/m.pyz", f"sha256:{DIGEST}", 'artifact_url = "x"', "the variable file sets artifact_url too"),
    ],
)
def test_artifact_options_that_cannot_work_are_refused_naming_the_option(
    url: str | None, checksum: str | None, var_file: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        artifact_variables(url, checksum, var_file)


def test_agent_job_chooses_between_the_fetched_build_and_the_venv() -> None:
    hcl = (REPO / AGENT_HCL).read_text()
    assert 'for_each = local.from_artifact ? [var.artifact_url] : []' in hcl
    assert 'checksum = var.artifact_checksum' in hcl
    assert 'command       = local.from_artifact ? var.python : "${var.venv}/bin/maglev-bridge"' in hcl


def test_agent_job_file_defines_the_job_the_cli_names() -> None:
    hcl = (REPO / AGENT_HCL).read_text()
    assert f'job "{AGENT_JOB}" {{' in hcl
    assert 'type        = "system"' in hcl and "max_parallel     = 1" in hcl
    assert 'kill_signal  = "SIGTERM"' in hcl and 'path     = "/health"' in hcl


# -- placement failures and plans -------------------------------------------------------------------

JOB = {
    "ID": "web",
    "Type": "service",
    "Constraints": [{"LTarget": "${meta.rack}", "Operand": "distinct_property", "RTarget": ""}],
    "TaskGroups": [{"Name": "web", "Count": 4}],
}
RACKS_FULL = {  # as Nomad 1.6.3 reported it for count 4 over racks a (2 nodes), b and c
    "web": {
        "NodesEvaluated": 4, "NodesFiltered": 4, "NodesAvailable": {"dc1": 4}, "ClassFiltered": {"app": 2, "lb": 2},
        "ConstraintFiltered": {
            "distinct_property: ${meta.rack}=rack-a used by 1 allocs": 2,
            "distinct_property: ${meta.rack}=rack-b used by 1 allocs": 1,
            "distinct_property: ${meta.rack}=rack-c used by 1 allocs": 1,
        },
        "NodesExhausted": 0, "DimensionExhausted": None, "CoalescedFailures": 0,
    }
}  # fmt: skip


def test_rack_placement_failure_is_one_line_naming_the_rack_constraint() -> None:
    assert explain_failures(JOB, RACKS_FULL) == [
        "web: 1 of 4 allocation(s) of group 'web' not placed: rack constraint distinct_property ${meta.rack} "
        "allows 1 per rack and every rack with a usable node already has 1 (rack-a, rack-b, rack-c)"
    ]


def test_placement_failure_names_exhausted_resources_and_other_constraints() -> None:
    metric = {"NodesEvaluated": 3, "ConstraintFiltered": {"${node.class} = lb": 2},
              "DimensionExhausted": {"memory": 1}, "CoalescedFailures": 2}  # fmt: skip
    (line,) = explain_failures(JOB, {"web": metric})
    assert line == (
        "web: 3 of 4 allocation(s) of group 'web' not placed: "
        "2 node(s) filtered by ${node.class} = lb; 1 node(s) out of memory"
    )


def test_system_job_nodes_filtered_by_its_own_constraints_are_not_failures() -> None:
    metric = {"NodesEvaluated": 2, "ConstraintFiltered": {"${node.class} = lb": 2}, "NodesExhausted": 0}
    assert explain_failures({**JOB, "Type": "system"}, {"web": metric}) == []


def test_plan_diff_shows_only_what_changes() -> None:
    diff = {
        "Type": "Edited", "ID": "web", "Fields": [{"Type": "None", "Name": "Priority", "Old": "50", "New": "50"}],
        "TaskGroups": [{
            "Type": "Edited", "Name": "web", "Updates": {"create": 1, "ignore": 3},
            "Fields": [{"Type": "Edited", "Name": "Count", "Old": "3", "New": "4", "Annotations": ["forces create"]}],
        }],
    }  # fmt: skip
    assert has_changes({"Diff": diff}) and not has_changes({"Diff": {"Type": "None"}})
    assert diff_lines(diff) == [
        "+/- Job: 'web'",
        "  +/- Task Group: 'web' (1 create, 3 ignore)",
        "    +/- Count: '3' => '4' (forces create)",
    ]
