"""What the Consul and Nomad clients share: reading a token, checking a TLS server name, and saying what a
server refused without repeating it.

One module, so the two clients cannot drift apart again: before, Consul let CONSUL_HTTP_TOKEN win over
`token_file` (py-consul reads the variable itself) while Nomad did the opposite. The addresses they connect
to are parsed with the configuration, in `bridge.core.addr`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from requests.adapters import HTTPAdapter

from bridge.core.addr import EndpointError


def read_token(key: str, token_file: str | None, env: str) -> str | None:
    """From `token_file` when set (an empty file means no token, never the environment's), else the
    environment variable. Read at every client construction, so a rotated file is picked up. Never logged."""
    if not token_file:
        return os.environ.get(env) or None
    try:
        return Path(token_file).read_text().strip() or None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise EndpointError(f"{key}: cannot read {token_file}: {reason}") from None


def client_cert(cert_file: str | None, key_file: str | None) -> tuple[str, str] | None:
    return (cert_file, key_file) if cert_file and key_file else None


class ServerNameAdapter(HTTPAdapter):
    """Verifies the server certificate against a fixed name (server.<dc>.consul, server.<region>.nomad)
    instead of the host in the address, as Consul's and Nomad's own tls_server_name do."""

    def __init__(self, server_name: str) -> None:
        self.server_name = server_name
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["server_hostname"] = self.server_name
        kwargs["assert_hostname"] = self.server_name
        super().init_poolmanager(*args, **kwargs)


_SECRET = re.compile(
    r"(?i)(x-consul-token|x-nomad-token|authorization|token|secret|password)(\s*[:=]\s*|\"\s*:\s*\")[^\s\",;]+"
    r"|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SUMMARY_CHARS = 160


def summarize_body(body: object, limit: int = SUMMARY_CHARS) -> str:
    """An error body as a log line may carry it: printable characters only, whitespace collapsed, anything
    that looks like a token (a header echoed back, a UUID) replaced, at most `limit` characters. Consul and
    Nomad echo request details in some errors, and the agent's log is read by more people than its token."""
    text = " ".join("".join(c if c.isprintable() else " " for c in str(body)[: limit * 4]).split())
    text = _SECRET.sub("<redacted>", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
