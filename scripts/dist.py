"""`make dist`: the agent as one self-contained file for the Nomad clients, which fetch it with the job's
`artifact` block and run it from the allocation directory: no virtualenv installed on any client.

    dist/maglev-bridge-<version>-<cpython>-<os>_<machine>.pyz   the agent and every dependency
    dist/maglev-bridge-<version>-<cpython>-<os>_<machine>.pyz.sha256   `<hex>  <file name>`, as sha256sum

Why a shiv zipapp: one file to serve and checksum (go-getter verifies one checksum per artifact), no
installer to run on the client, and once unpacked it starts like an installed package. shiv unpacks it once
per allocation into SHIV_ROOT (the job puts that in the task directory, so Nomad's garbage collection removes
it with the allocation). Measured beside it: pex costs about 3x the CPU at every start (its bootstrap) and
took 3x as long to build; a wheelhouse plus installer runs `python3 -m venv` and pip on every client for each
new allocation (a minute or more on a loaded host). The figures are in docs/nomad.md ("The agent's build").

The binary wheels (numpy, msgspec) are those of the CPython that runs this script, so the artifact runs on
that CPython version and machine only: the name says which, and the artifact's preamble
(scripts/dist_preamble.py) refuses any other interpreter with one clear line. numba (the `fast` extra) is
left out.

`--version` builds the same code under another version number (tests roll one build over another).
Two builds of the same sources still differ (pip records the temporary source directory in the wheel's
direct_url.json), so a build is known by its checksum file, not rebuilt to check it.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREAMBLE = REPO / "scripts" / "dist_preamble.py"
VERSION_LINE = re.compile(r'^version = "([^"]+)"$', re.MULTILINE)


def platform_tag() -> str:
    tag: str = runpy.run_path(str(PREAMBLE))["platform_tag"]()
    return tag


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sources(into: Path, version: str | None) -> str:
    """A clean copy of what the wheel is built from (no caches, no build leftovers), with `version` if
    given; the version it carries."""
    into.mkdir()
    shutil.copy(REPO / "README.md", into)
    shutil.copytree(REPO / "bridge", into / "bridge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    text = (REPO / "pyproject.toml").read_text()
    if version is not None:
        text = VERSION_LINE.sub(f'version = "{version}"', text, count=1)
    (into / "pyproject.toml").write_text(text)
    found = VERSION_LINE.search(text)
    assert found is not None, "pyproject.toml has no version line"
    return found.group(1)


def build(out: Path, version: str | None = None) -> Path:
    """Build the artifact and its checksum file into `out`; the artifact's path."""
    tag = platform_tag()
    with tempfile.TemporaryDirectory(prefix="maglev-dist-") as tmp:
        work = Path(tmp)
        version = _sources(work / "src", version)
        preamble = work / "preamble.py"
        preamble.write_text(PREAMBLE.read_text().replace("@PLATFORM@", tag))
        out.mkdir(parents=True, exist_ok=True)
        artifact = out / f"maglev-bridge-{version}-{tag}.pyz"
        subprocess.run(
            [sys.executable, "-m", "shiv", "--quiet", "--reproducible", "--compressed",
             "--console-script", "maglev-bridge", "--python", "/usr/bin/env python3",
             "--preamble", str(preamble), "--output-file", str(artifact), str(work / "src")],
            check=True,
        )  # fmt: skip
    checksum = out / f"{artifact.name}.sha256"
    checksum.write_text(f"{sha256_file(artifact)}  {artifact.name}\n")
    return artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "dist"), help="output directory (default dist/)")
    parser.add_argument("--version", help="build under this version instead of pyproject.toml's")
    args = parser.parse_args()
    artifact = build(Path(args.out), args.version)
    size = artifact.stat().st_size / 1e6
    print(f"{artifact} ({size:.1f} MB), sha256:{sha256_file(artifact)}")


if __name__ == "__main__":
    main()
