"""The agent's build as its system job fetches it (`jobs ... --agent-artifact URL`): the URL and checksum
become the job's `artifact_url` and `artifact_checksum` variables, so the operator never edits HCL to roll a
new version out. go-getter on each client refuses a download whose checksum differs; this module only makes
sure the checksum it is given is one, computing it from a local copy of the build when asked."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from bridge.core.config import ConfigError

OPTION = "--agent-artifact-checksum"
SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


def artifact_checksum(given: str | None) -> str:
    """`sha256:<hex>` from `given`: that text itself, or a local copy of the build (its SHA-256 is
    computed), or the `.sha256` file `make dist` wrote beside it (`<hex>  <name>`, as sha256sum)."""
    if not given:
        raise ConfigError(
            f"{OPTION}: --agent-artifact needs the build's checksum: sha256:<64 hex digits>, or the path of "
            "a local copy of the build or of its .sha256 file"
        )
    if given.startswith("sha256:"):
        if not SHA256.fullmatch(given.lower()):
            raise ConfigError(f"{OPTION}: {given!r}: expected sha256: and 64 hex digits")
        return given.lower()
    path = Path(given)
    try:
        if path.suffix == ".sha256":
            words = path.read_text().split()
            checksum = f"sha256:{words[0].lower() if words else ''}"
            if not SHA256.fullmatch(checksum):
                raise ConfigError(f"{OPTION}: {given}: expected `<64 hex digits>  <file name>` as sha256sum writes")
            return checksum
        with path.open("rb") as f:
            return f"sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}"
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{OPTION}: {given}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None


def artifact_variables(url: str | None, checksum: str | None, var_file_text: str) -> dict[str, str]:
    """The job variables for `--agent-artifact URL`; none without it. Each variable is set in one place:
    the command line or the variable file, never both (HCL refuses a variable set twice, less clearly)."""
    if not url:
        if checksum:
            raise ConfigError(f"{OPTION}: only with --agent-artifact URL")
        return {}
    variables = {"artifact_url": url, "artifact_checksum": artifact_checksum(checksum)}
    for name in variables:
        if re.search(rf"^\s*{name}\s*=", var_file_text, re.MULTILINE):
            raise ConfigError(f"--agent-artifact: the variable file sets {name} too; set it in one place")
    return variables
