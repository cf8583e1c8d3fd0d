"""Runs inside the built artifact (shiv's preamble), after shiv has unpacked it and before the agent is
imported. The artifact carries binary wheels (numpy, msgspec) for one CPython version and one machine; on
another interpreter they would fail to import with an error about a shared object, far from the cause. This
names the cause and exits 2, the agent's exit code for a setup it refuses to start with.

`scripts/dist.py` reads `platform_tag` from this file for the artifact's name and writes the build's tag
in place of the placeholder below, so the name and the check can never disagree."""

from __future__ import annotations

import platform
import sys

BUILT_FOR = "@PLATFORM@"


def platform_tag() -> str:
    """This interpreter and machine as the artifact names them, for example `cp311-linux_x86_64`."""
    implementation = {"cpython": "cp"}.get(sys.implementation.name, sys.implementation.name)
    version = f"{sys.version_info.major}{sys.version_info.minor}"
    return f"{implementation}{version}-{sys.platform}_{platform.machine()}"


if __name__ == "__main__" and platform_tag() != BUILT_FOR:
    print(
        f"maglev-bridge: this build is for {BUILT_FOR} (CPython version, OS, machine) and cannot run on "
        f"{platform_tag()} ({sys.executable}); run it with that CPython (the job's `python` variable) or build "
        "one for this platform with `make dist` on it",
        file=sys.stderr,
    )
    sys.exit(2)
