"""What the Consul and Nomad clients (and the agent's own HTTP endpoint) share: parsing an address,
reading a token, checking a TLS server name, and saying what a server refused without repeating it.

One module, so the two clients cannot drift apart again: before, Consul let CONSUL_HTTP_TOKEN win over
`token_file` (py-consul reads the variable itself) while Nomad did the opposite, and an IPv6 address or a
scheme neither client speaks passed validation and failed only inside a watch thread.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from requests.adapters import HTTPAdapter

SCHEMES = ("http", "https")


class EndpointError(ValueError):
    """An address, token or file that the clients cannot use; the message names the key."""


@dataclass(frozen=True)
class HostPort:
    host: str
    """An IP literal or a DNS name, without brackets."""
    port: int

    @property
    def netloc(self) -> str:
        """host:port as a URL needs it: IPv6 literals in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Url:
    scheme: str
    where: HostPort

    @property
    def text(self) -> str:
        return f"{self.scheme}://{self.where.netloc}"


def _port(key: str, text: str | None, default: int | None) -> int:
    if text is None or text == "":
        if default is None:
            raise EndpointError(f"{key}: a port is needed (host:port)")
        return default
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise EndpointError(f"{key}: port {text!r} must be a number from 1 to 65535")
    return int(text)


def _host(key: str, text: str, *, literal: bool) -> str:
    """An IP literal, or (unless `literal`) a DNS name of letters, digits, dots and dashes."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if literal:
        raise EndpointError(f"{key}: {text!r} is not an IP address (IPv6 in brackets: [::1]:9119)")
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", text) or ".." in text:
        raise EndpointError(f"{key}: {text!r} is neither an IP address nor a host name")
    return text


def parse_host_port(key: str, text: str, *, default_port: int | None = None, literal: bool = False) -> HostPort:
    """`host:port`, `[v6]:port` (or `host` alone with a default port). `literal` refuses names: a socket
    to bind or a DNS server to ask needs an address."""
    if not isinstance(text, str) or not text:
        raise EndpointError(f"{key}: expected host:port, got {text!r}")
    if text.startswith("["):
        inside, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise EndpointError(f"{key}: {text!r}: expected [IPv6]:port")
        address = inside
        try:
            if not isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address):
                raise ValueError
        except ValueError:
            raise EndpointError(f"{key}: {address!r} in brackets is not an IPv6 address") from None
        return HostPort(str(ipaddress.ip_address(address)), _port(key, rest[1:] or None, default_port))
    if text.count(":") > 1:
        raise EndpointError(f"{key}: {text!r}: an IPv6 address needs brackets, as in [::1]:9119")
    host, sep, port = text.partition(":")
    if sep and not port:
        raise EndpointError(f"{key}: {text!r}: the port after ':' is missing")
    return HostPort(_host(key, host, literal=literal), _port(key, port if sep else None, default_port))


def parse_url(key: str, text: str, default_port: int) -> Url:
    """`scheme://host[:port]` (scheme http or https, as both clients speak them), or `host[:port]` meaning
    http, as CONSUL_HTTP_ADDR allows. No path, user or query: the clients would drop or misuse them."""
    if not isinstance(text, str) or not text:
        raise EndpointError(f"{key}: expected an address like http://127.0.0.1:{default_port}, got {text!r}")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
    if scheme.lower() not in SCHEMES:
        raise EndpointError(f"{key}: scheme {scheme!r} is not supported; use http:// or https://")
    parts = urlsplit(f"//{rest}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in rest:
        raise EndpointError(f"{key}: {text!r}: only scheme://host:port is allowed (no path, user or query)")
    return Url(scheme.lower(), parse_host_port(key, rest.rstrip("/"), default_port=default_port))


def check_readable(key: str, path: str) -> None:
    """A file the agent will open later (token, CA, certificate, key): refused now rather than at use."""
    file = Path(path)
    if not file.exists():
        raise EndpointError(f"{key}: {path} does not exist")
    if not file.is_file():
        raise EndpointError(f"{key}: {path} is not a regular file")
    if not os.access(file, os.R_OK):
        raise EndpointError(f"{key}: {path} is not readable by this user")


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
