"""Addresses: fast IPv4 and IPv6 text <-> integer helpers, and the host:port and URL forms the configuration writes.

A catalog repeats the same few thousand addresses across 100,000 instances; `ipaddress` objects for each of
them cost more than the rest of planning together. The host:port and URL parsers are shared by the Consul
and Nomad clients and the agent's own HTTP endpoint, so an IPv6 address or a scheme none of them speaks is
refused when the configuration is read, not inside a watch thread.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, NamedTuple
from urllib.parse import urlsplit


@lru_cache(maxsize=65536)
def ipv4_int(text: str) -> int:
    """The address as an integer; ValueError unless `text` is a strict dotted quad."""
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, TypeError):
        raise ValueError(f"{text!r} is not an IPv4 address") from None


def ipv4_text(value: int) -> str:
    return socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))


Family = Literal[4, 6]


class IpValue(NamedTuple):
    """An address of either family as a number: what orders and matches VIPs, real servers and prefixes.
    Sorting by it puts every IPv4 address before every IPv6 one, as `ipvsadm -Ln` lists services (it sorts
    by address family, AF_INET before AF_INET6)."""

    family: Family
    value: int


@lru_cache(maxsize=65536)
def ip_value(text: str) -> IpValue:
    """`text` as (family, number); ValueError unless it is a strict dotted quad or an IPv6 address (without
    brackets, zone or prefix)."""
    if ":" not in text:
        return IpValue(4, ipv4_int(text))
    try:
        return IpValue(6, int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big"))
    except (OSError, TypeError):
        raise ValueError(f"{text!r} is not an IPv6 address") from None


@lru_cache(maxsize=65536)
def canonical_ip(text: str) -> str:
    """The one text form of an address: IPv4 as given (a strict dotted quad has one form), IPv6 compressed
    and lowercase (RFC 5952, as `ipaddress` writes it), so every director, the kernel's read-back and the
    state file name one VIP with one string. ValueError as `ip_value`."""
    family, value = ip_value(text)
    return text if family == 4 else str(ipaddress.IPv6Address(value))


def bracketed(address: str) -> str:
    """An address as it stands before ":port": IPv6 in brackets, as URLs write it."""
    return f"[{address}]" if ":" in address else address


def host_prefix(address: str) -> str:
    """The address as a host route or address prefix: /32 for IPv4, /128 for IPv6."""
    return f"{address}/128" if ":" in address else f"{address}/32"


def split_host_port(text: str) -> tuple[str, str, str]:
    """(host, ":" or "", port text) of `<ipv4>[:<port>]` or `[<ipv6>][:<port>]`, brackets removed; the host
    is not checked. ValueError for an unclosed bracket, text after it that is not ":port", brackets around
    what cannot be IPv6, or an IPv6 address without brackets (its last group would be read as a port)."""
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")) or ":" not in host:
            raise ValueError(f"expected [<ipv6>]:<port>, got {text!r}")
        return host, rest[:1], rest[1:]
    if text.count(":") > 1:
        raise ValueError(f"an IPv6 address needs brackets, as in [2001:db8::10]:80, got {text!r}")
    return text.partition(":")


def ascii_number(text: str, high: int) -> int | None:
    """`text` as a number from 0 to `high` when it is nothing but ASCII digits, else None. `str.isdigit()`
    alone accepts '²' and the digits of every script (which `int()` refuses or silently converts), and an
    unbounded digit string makes `int()` raise past Python's 4,300-digit limit."""
    if not text.isascii() or not text.isdigit() or len(text) > len(str(high)):
        return None
    value = int(text)
    return value if value <= high else None


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
