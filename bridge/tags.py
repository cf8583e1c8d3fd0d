"""The tag grammar, the agent's user interface in Consul:

    <prefix>.vip=<ipv4>[:<port>][/tcp|/udp]   repeatable; port defaults to the instance's port
    <prefix>.weight=<0..65535>                 default 1
    <prefix>.flags=<mh-port,mh-fallback>       default from configuration

An instance without a vip tag is not ours. Any malformed tag of ours rejects the instance's whole claim:
applying part of what an operator wrote would be a guess.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from bridge.config import KNOWN_FLAGS, Config
from bridge.model import Instance, Protocol, Rejection

MAX_WEIGHT = 65535


@dataclass(frozen=True)
class Claim:
    vip: str
    port: int
    protocol: Protocol
    tag: str

    @property
    def key(self) -> tuple[str, int, Protocol]:
        return (self.vip, self.port, self.protocol)


@dataclass(frozen=True)
class InstanceClaim:
    """What one instance asks for, once its tags have been understood."""

    instance: Instance
    claims: tuple[Claim, ...]
    weight: int
    flags: tuple[str, ...]


class TagError(ValueError):
    def __init__(self, tag: str, reason: str) -> None:
        super().__init__(reason)
        self.tag = tag
        self.reason = reason


def _port(tag: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise TagError(tag, f"port {text!r} is not a number from 1 to 65535")
    return int(text)


def parse_vip(tag: str, value: str, default_port: int, config: Config) -> Claim:
    rest, slash, proto = value.partition("/")
    if slash and proto not in ("tcp", "udp"):
        raise TagError(tag, f"protocol {proto!r} is not tcp or udp")
    protocol: Protocol = "udp" if proto == "udp" else "tcp"
    if rest.startswith("[") or rest.count(":") > 1:
        raise TagError(tag, "IPv6 VIPs are not supported yet; expected <ipv4>[:<port>][/tcp|/udp]")
    host, colon, port_text = rest.partition(":")
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise TagError(tag, f"{host!r} is not an IPv4 address; expected <ipv4>[:<port>][/tcp|/udp]") from None
    if not config.is_vip_allowed(address):
        allowed = ", ".join(str(n) for n in config.vip_cidrs) or "none configured"
        raise TagError(tag, f"VIP {address} is outside vip_cidrs ({allowed})")
    if colon:
        port = _port(tag, port_text)
    elif 1 <= default_port <= 65535:
        port = default_port
    else:
        raise TagError(tag, f"no port in the tag and the instance's port {default_port} is not usable")
    return Claim(str(address), port, protocol, tag)


def parse_weight(tag: str, value: str) -> int:
    if not value.isdigit() or int(value) > MAX_WEIGHT:
        raise TagError(tag, f"weight {value!r} is not an integer from 0 to {MAX_WEIGHT}")
    return int(value)


def parse_flags(tag: str, value: str) -> tuple[str, ...]:
    flags = tuple(f.strip() for f in value.split(",") if f.strip())
    unknown = [f for f in flags if f not in KNOWN_FLAGS]
    if unknown:
        raise TagError(tag, f"unknown flag(s) {', '.join(unknown)}; expected a comma list of {', '.join(KNOWN_FLAGS)}")
    return tuple(sorted(set(flags)))


def _parse(instance: Instance, config: Config) -> InstanceClaim | None:
    prefix = config.tag_prefix + "."
    claims: list[Claim] = []
    weight: int | None = None
    flags: tuple[str, ...] | None = None
    for tag in instance.tags:
        if not tag.startswith(prefix):
            continue
        key, eq, value = tag[len(prefix) :].partition("=")
        if not eq:
            raise TagError(tag, f"expected {prefix}{key}=<value>")
        if key == "vip":
            claims.append(parse_vip(tag, value, instance.port, config))
        elif key == "weight":
            if weight is not None:
                raise TagError(tag, "weight is given more than once")
            weight = parse_weight(tag, value)
        elif key == "flags":
            if flags is not None:
                raise TagError(tag, "flags are given more than once")
            flags = parse_flags(tag, value)
        else:
            raise TagError(tag, f"unknown key {key!r}; expected {prefix}vip, {prefix}weight or {prefix}flags")
    if not claims:
        return None
    unique = tuple(
        sorted({c.key: c for c in claims}.values(), key=lambda c: (ipaddress.IPv4Address(c.vip), c.port, c.protocol))
    )
    return InstanceClaim(
        instance=instance,
        claims=unique,
        weight=1 if weight is None else weight,
        flags=tuple(sorted(config.default_flags)) if flags is None else flags,
    )


def parse_instance(instance: Instance, config: Config) -> InstanceClaim | Rejection | None:
    """An instance's claim, a rejection naming the tag at fault, or None when the instance is not ours."""
    try:
        return _parse(instance, config)
    except TagError as err:
        has_vip = any(t.startswith(config.tag_prefix + ".vip") for t in instance.tags)
        if not has_vip:
            return None
        return Rejection(instance.service, instance.instance_id, err.tag, err.reason)
