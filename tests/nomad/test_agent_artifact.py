"""The agent's system job brings its own build: every client fetches the artifact of `make dist` from a URL
(here a plain HTTP server on 127.0.0.1), go-getter checks its checksum, and the agent runs from the
allocation directory with the host's CPython and nothing installed for it. Real Nomad cluster as in
test_nomad_jobs.py (directors on nomad-c1 and nomad-c3, class lb)."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from bridge.core.config import load_config
from bridge.inspect.discover import discover, discovery_text
from tests.harness.consul_agent import resolver
from tests.harness.nomad_cluster import NomadCluster
from tests.harness.wait import wait_until
from tests.nomad.test_nomad_jobs import REPO, http_port, jobs, ops_config, passing, running

pytestmark = pytest.mark.nomad
VERSION_A, VERSION_B = "0.1.0+a", "0.1.0+b"
# The host's CPython itself, outside any virtualenv (sys.executable may be .venv's).
PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))


@dataclass(frozen=True)
class Build:
    version: str
    path: Path
    url: str


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Each client's download would be a line on stderr."""


@pytest.fixture(scope="session")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Build]]:
    """Two versions of the same code, built once per session by `scripts/dist.py` (in parallel: each is
    mostly pip waiting on the index) and served over HTTP on loopback."""
    out = tmp_path_factory.mktemp("dist")
    procs = [
        subprocess.Popen([sys.executable, str(REPO / "scripts/dist.py"), "--out", str(out), "--version", version],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for version in (VERSION_A, VERSION_B)
    ]  # fmt: skip
    for proc in procs:
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, output
    handler = functools.partial(QuietHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    found = {}
    for version in (VERSION_A, VERSION_B):
        (path,) = out.glob(f"maglev-bridge-{version}-*.pyz")
        found[version] = Build(version, path, f"http://127.0.0.1:{server.server_port}/{path.name}")
    yield found
    server.shutdown()


@pytest.fixture
def cluster(nomad_cluster: NomadCluster) -> Iterator[NomadCluster]:
    yield nomad_cluster
    nomad_cluster.stop_all_jobs()


def deploy_args(cluster: NomadCluster, tmp_path: Path, stagger: str = "5s") -> list[str]:
    """`jobs deploy` of the agent's job alone, shadow directors on the lb clients. `venv` names a directory
    that does not exist: an agent that runs at all runs from its artifact."""
    consul = cluster.consul
    agent_config = tmp_path / "agent.yaml"
    agent_config.write_text(yaml.safe_dump({
        "dataplane": "shadow",
        "vip_cidrs": ["198.51.100.0/24"],
        "resync_interval": 2,
        "consul": {"address": f"http://{consul.http_addr}", "service_name": "maglev-bridge-self"},
    }))  # fmt: skip
    var_file = tmp_path / "agent.vars.hcl"
    var_file.write_text(
        f'python = "{PYTHON}"\nvenv = "/nonexistent/venv"\ndatacenters = ["dc1"]\nbackend_class = ""\n'
        f'stagger = "{stagger}"\n'
    )
    ops = ops_config(tmp_path / "ops.yaml", cluster, REPO / "jobs")
    dns = {"dns_address": f"127.0.0.1:{consul.dns_port}"}
    ops.write_text(ops.read_text().replace("consul:\n", f"consul:\n  dns_address: {dns['dns_address']}\n"))
    return ["deploy", "--config", str(ops), "--agent-config", str(agent_config), "--agent-var-file", str(var_file),
            "--agent-job", str(REPO / "hcl/maglev-bridge.nomad.hcl"), "--only", "maglev-bridge", "--timeout", "180"]


def versions_seen(config_path: str) -> dict[str, str]:
    """Director address:port -> version, as `status --discover` finds them (passing in Consul DNS)."""
    found = discover(load_config(config_path))
    return {d.label: d.status.agent.version if d.status else "?" for d in found.directors}


def test_agent_job_runs_its_build_from_the_allocation_and_rolls_a_new_one_one_director_at_a_time(
    cluster: NomadCluster, builds: dict[str, Build], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = builds[VERSION_A], builds[VERSION_B]
    # Nomad 1.6 does not wait for a system job's new allocation to be healthy before replacing the next one:
    # only `stagger` keeps them apart. A new allocation downloads and unpacks the build before its first pass,
    # which took up to ~25 s on the loaded 2-core test host, so the stagger here is generous.
    args = deploy_args(cluster, tmp_path, stagger="45s")
    code, out, err = jobs(capsys, *args, "--agent-artifact", a.url, "--agent-artifact-checksum", str(a.path))
    assert code == 0, out + err
    assert out.splitlines()[-1] == "maglev-bridge: 2/2 running, 2 healthy"

    allocs = running(cluster, "maglev-bridge")
    assert sorted(a["NodeName"] for a in allocs) == ["nomad-c1", "nomad-c3"]
    ports = sorted(http_port(cluster, alloc["ID"]) for alloc in allocs)
    r = resolver(cluster.consul)
    assert sorted(rr.port for rr in r.resolve("maglev-bridge.service.consul", "SRV")) == ports
    ops = args[args.index("--config") + 1]
    assert sorted(versions_seen(ops).values()) == [VERSION_A, VERSION_A]
    # The agents register themselves too, with their version in the service's meta.
    own = wait_until(lambda: len(p := passing(cluster.consul, "maglev-bridge-self")) == 2 and p, timeout=30)
    assert sorted(e["Service"]["Meta"]["version"] for e in own) == [VERSION_A, VERSION_A]
    for alloc in allocs:  # the build is in the allocation's task directory, unpacked there by shiv
        task_dir = cluster.base_dir / alloc["NodeName"] / "data/alloc" / alloc["ID"] / "agent/local"
        assert (task_dir / "maglev-bridge.pyz").read_bytes() == a.path.read_bytes()
        assert any((task_dir / "shiv").iterdir())

    # The upgrade: another artifact URL. Nomad replaces one director, waits `stagger`, then the next;
    # status --discover, polled meanwhile, sees the versions side by side and never no director at all.
    deploy = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "jobs", *args, "--agent-artifact", b.url,
         "--agent-artifact-checksum", f"{b.path}.sha256"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    samples: list[dict[str, str]] = []
    mixed_text = ""
    while deploy.poll() is None:
        seen = versions_seen(ops)
        samples.append(seen)
        if not mixed_text and set(seen.values()) == {VERSION_A, VERSION_B}:
            mixed_text = discovery_text(discover(load_config(ops)))
        time.sleep(0.3)
    out = deploy.stdout.read() if deploy.stdout else ""
    assert deploy.returncode == 0, out
    assert any(line.endswith(", 1 on an older version") for line in out.splitlines()), out
    assert out.splitlines()[-1] == "maglev-bridge: 2/2 running, 2 healthy"
    assert all(samples), f"a moment with no healthy director: {samples}"
    assert any(set(s.values()) == {VERSION_A, VERSION_B} for s in samples), samples
    assert VERSION_A in mixed_text and VERSION_B in mixed_text, mixed_text
    # One at a time: the first director came back on B while the other still served A, the second later.
    first_b = next(i for i, s in enumerate(samples) if VERSION_B in s.values())
    assert VERSION_A in samples[first_b].values()
    assert wait_until(lambda: sorted(versions_seen(ops).values()) == [VERSION_B, VERSION_B], timeout=30)


def test_a_wrong_checksum_fails_the_allocation_and_deploy_says_why_in_one_line(
    cluster: NomadCluster, builds: dict[str, Build], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = builds[VERSION_A]
    wrong = "sha256:" + "0" * 64
    code, out, err = jobs(capsys, *deploy_args(cluster, tmp_path), "--agent-artifact", a.url,
                          "--agent-artifact-checksum", wrong)  # fmt: skip
    assert code == 1, out + err
    failed = [line for line in out.splitlines() if "allocation" in line]
    assert failed, out
    for line in failed:  # one line per allocation, at its first failed download (Nomad retries it)
        assert " cannot fetch its artifact: " in line and "checksums did not match" in line.lower(), line
        assert a.url in line, line
    assert not passing(cluster.consul, "maglev-bridge")


def other_cpython() -> str | None:
    """A CPython of another minor version on this host (pyenv's, then the PATH without pyenv's shims, which
    name versions that may not be installed), if there is one."""
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    names = [f"python3.{minor}" for minor in range(8, 16) if f"3.{minor}" != mine]
    found = sorted(str(p) for name in names for p in Path.home().glob(f".pyenv/versions/*/bin/{name}"))
    found += [p for p in (shutil.which(name) for name in names) if p and "/shims/" not in p]
    return found[0] if found else None


def test_the_build_runs_on_its_cpython_and_refuses_another_in_one_line(
    builds: dict[str, Build], tmp_path: Path
) -> None:
    a = builds[VERSION_A]
    env = {**os.environ, "SHIV_ROOT": str(tmp_path / "shiv")}
    ran = subprocess.run([PYTHON, "-I", str(a.path), "--version"], capture_output=True, text=True, env=env)
    assert (ran.returncode, ran.stdout) == (0, f"maglev-bridge {VERSION_A}\n"), ran.stderr
    other = other_cpython()
    if other is None:
        pytest.skip("no CPython of another version on this host to run the build with")
    ran = subprocess.run([other, "-I", str(a.path), "--version"], capture_output=True, text=True, env=env)
    assert ran.returncode == 2 and ran.stdout == ""
    (line,) = ran.stderr.splitlines()
    tag = "-".join(a.path.name.removesuffix(".pyz").split("-")[-2:])  # cp311-linux_x86_64
    assert line.startswith(f"maglev-bridge: this build is for {tag} ")
    assert f"cannot run on cp3{other.rsplit('python3.', 1)[1]}-" in line
