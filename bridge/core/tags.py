"""The tag grammar, the agent's user interface in Consul:

    <prefix>.vip=<ipv4>[:<port>][/tcp|/udp]   repeatable; port defaults to the instance's port
    <prefix>.vip=[<ipv6>][:<port>][/tcp|/udp] an IPv6 VIP in brackets, as URLs write it (needs encapsulation: gue)
    <prefix>.weight=<0..65535>                 default 1
    <prefix>.flags=<mh-port,mh-fallback>       default from configuration
    <prefix>.allow=<cidr>[,<cidr>...]          repeatable; source prefixes the service accepts (bridge/core/allow.py)

An instance without a vip tag is not ours. Any malformed tag of ours rejects the instance's whole claim:
applying part of what an operator wrote would be a guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from bridge.core.addr import ascii_number, canonical_ip, ip_value, split_host_port
from bridge.core.allow import (
    FAMILY_NAMES,
    AllowList,
    Network,
    PrefixError,
    collapse,
    describe,
    for_family,
    parse_prefixes,
)
from bridge.core.config import KNOWN_FLAGS, Config
from bridge.core.keys import Protocol, ServiceKey
from bridge.core.model import Instance, Rejection

MAX_WEIGHT = 65535
KEYS = ("vip", "weight", "flags", "allow")
VIP_FORM = "<ipv4>[:<port>][/tcp|/udp] or [<ipv6>][:<port>][/tcp|/udp]"


@dataclass(frozen=True)
class Claim:
    vip: str
    port: int
    protocol: Protocol
    tag: str

    @cached_property
    def key(self) -> ServiceKey:
        """Made once: a claim is cached per tag and its key asked for once per instance behind it."""
        return ServiceKey(self.vip, self.port, self.protocol)


class InstanceClaim(NamedTuple):
    """What one instance asks for, once its tags have been understood. A NamedTuple rather than a frozen
    dataclass: one is made per instance, and a 100,000-instance catalog must plan in about a second."""

    instance: Instance
    claims: tuple[Claim, ...]
    weight: int
    flags: tuple[str, ...]
    allow: AllowList
    """The instance's allow list: its allow tags merged, or the configured default when it has none."""


Parsed = tuple[tuple[Claim, ...], int, tuple[str, ...], AllowList]


class TagError(ValueError):
    def __init__(self, tag: str, reason: str) -> None:
        super().__init__(reason)
        self.tag = tag
        self.reason = reason


def _port(tag: str, text: str) -> int:
    port = ascii_number(text, 65535)
    if not port:
        raise TagError(tag, f"port {text!r} is not a number from 1 to 65535")
    return port


def ipv6_vip_refusal(config: Config) -> str | None:
    """Why this fleet cannot serve IPv6 VIPs, or None when it can: the one place that decides it, for the
    director and the backend role alike (a claim refused here creates nothing anywhere).

    With `encapsulation: fou` a director reaches its real servers through ipip links by IPVS direct routing:
    ipip carries only IPv4, and IPVS accepts a real server of another address family than its service only
    with tunnel forwarding. In `gue` mode IPVS's own GUE tunnel carries the IPv6 packet to the backend's IPv4
    address (the backend's fou hands it to the sit handler)."""
    if config.encapsulation == "gue":
        return None
    return "IPv6 VIPs need encapsulation: gue (ipip+fou tunnels carry IPv4 only)"


def parse_vip(tag: str, value: str, default_port: int, config: Config) -> Claim:
    rest, slash, proto = value.partition("/")
    if slash and proto not in ("tcp", "udp"):
        raise TagError(tag, f"protocol {proto!r} is not tcp or udp")
    protocol: Protocol = "udp" if proto == "udp" else "tcp"
    try:
        host, colon, port_text = split_host_port(rest)
    except ValueError as err:
        raise TagError(tag, f"{err}; expected {VIP_FORM}") from None
    try:
        address = ip_value(host)
    except ValueError:
        raise TagError(tag, f"{host!r} is not an IPv4 or IPv6 address; expected {VIP_FORM}") from None
    host = canonical_ip(host)
    if not config.is_vip_allowed(address):
        allowed = ", ".join(str(n) for n in config.vip_cidrs) or "none configured"
        raise TagError(tag, f"VIP {host} is outside vip_cidrs ({allowed})")
    refusal = ipv6_vip_refusal(config) if address.family == 6 else None
    if refusal:
        raise TagError(tag, refusal)
    if colon:
        port = _port(tag, port_text)
    elif 1 <= default_port <= 65535:
        port = default_port
    else:
        raise TagError(tag, f"no port in the tag and the instance's port {default_port} is not usable")
    return Claim(host, port, protocol, tag)


def parse_weight(tag: str, value: str) -> int:
    weight = ascii_number(value, MAX_WEIGHT)
    if weight is None:
        raise TagError(tag, f"weight {value!r} is not an integer from 0 to {MAX_WEIGHT}")
    return weight


def parse_flags(tag: str, value: str) -> tuple[str, ...]:
    flags = tuple(f.strip() for f in value.split(",") if f.strip())
    unknown = [f for f in flags if f not in KNOWN_FLAGS]
    if unknown:
        raise TagError(tag, f"unknown flag(s) {', '.join(map(repr, unknown))}; "
                            f"expected a comma list of {', '.join(KNOWN_FLAGS)}")
    return tuple(sorted(set(flags)))


def parse_allow(tag: str, value: str) -> tuple[Network, ...]:
    try:
        return parse_prefixes(value)
    except PrefixError as err:
        raise TagError(tag, f"{err}; expected <cidr>[,<cidr>...]") from None


class TagParser:
    """Parses instances against one configuration, remembering each VIP tag it has understood: a large
    catalog repeats the same VIP tag on every instance behind it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.prefix = config.tag_prefix + "."
        self.default_flags = tuple(sorted(config.default_flags))
        self._vips: dict[tuple[str, int], Claim | TagError] = {}
        self._tag_sets: dict[tuple[tuple[str, ...], int], Parsed | None] = {}

    def cached(self) -> int:
        return len(self._vips) + len(self._tag_sets)

    def _vip(self, tag: str, value: str, default_port: int) -> Claim:
        known = self._vips.get((tag, default_port))
        if known is None:
            try:
                known = parse_vip(tag, value, default_port, self.config)
            except TagError as err:
                known = err
            self._vips[(tag, default_port)] = known
        if isinstance(known, TagError):
            raise known
        return known

    def _parse(self, instance: Instance) -> InstanceClaim | None:
        key = (instance.tags, instance.port)
        if key not in self._tag_sets:
            self._tag_sets[key] = self._parse_tags(instance.tags, instance.port)
        parsed = self._tag_sets[key]
        if parsed is None:
            return None
        return InstanceClaim(instance, *parsed)

    def _parse_tags(self, tags: tuple[str, ...], port: int) -> Parsed | None:
        """Claims, weight, flags and allow list of one tag set; raises TagError (not cached: rejections are
        rare). Several allow tags add up: a long list may be split over tags (Consul limits a tag's length)."""
        prefix = self.prefix
        claims: list[Claim] = []
        weight: int | None = None
        flags: tuple[str, ...] | None = None
        allowed: list[Network] | None = None
        for tag in tags:
            if not tag.startswith(prefix):
                continue
            key, eq, value = tag[len(prefix) :].partition("=")
            if not eq:
                shown = key if key in KEYS else "<key>"
                raise TagError(tag, f"expected {prefix}{shown}=<value>")
            if key == "vip":
                claims.append(self._vip(tag, value, port))
            elif key == "weight":
                if weight is not None:
                    raise TagError(tag, "weight is given more than once")
                weight = parse_weight(tag, value)
            elif key == "flags":
                if flags is not None:
                    raise TagError(tag, "flags are given more than once")
                flags = parse_flags(tag, value)
            elif key == "allow":
                allowed = [*(allowed or ()), *parse_allow(tag, value)]
            else:
                raise TagError(tag, f"unknown key {key!r}; expected {prefix}vip, {prefix}weight, {prefix}flags "
                                    f"or {prefix}allow")
        if not claims:
            return None
        if len(claims) > 1:
            claims = sorted({c.key: c for c in claims}.values(), key=lambda c: c.key.listing_order())
        allow = self.config.default_allow if allowed is None else collapse(allowed)
        if allow is not None:  # None admits every client of both families (and is the common case: no call)
            for claim in claims:
                _check_allow_family(claim, allow, "default_allow" if allowed is None else f"the {prefix}allow list")
        return (tuple(claims), 1 if weight is None else weight, self.default_flags if flags is None else flags,
                allow)

    def parse(self, instance: Instance) -> InstanceClaim | Rejection | None:
        """An instance's claim, a rejection naming the tag at fault, or None when the instance is not ours."""
        try:
            return self._parse(instance)
        except TagError as err:
            if not any(t.startswith(self.prefix + "vip") for t in instance.tags):
                return None
            return Rejection(instance.service, instance.instance_id, err.tag, err.reason)


def _check_allow_family(claim: Claim, allow: AllowList, source: str) -> None:
    """A list without a prefix of the VIP's family would drop every client of that VIP: refused, not guessed
    (bridge/core/allow.py)."""
    family = claim.key.family
    if for_family(allow, family) == ():
        name = FAMILY_NAMES[family]
        everyone = "::/0" if family == 6 else "0.0.0.0/0"
        raise TagError(claim.tag, f"{source} ({describe(allow)}) has no {name} prefix, so no client could reach "
                                  f"{name} VIP {claim.vip}; add {name} prefixes ({everyone}: every client)")


def parse_instance(instance: Instance, config: Config) -> InstanceClaim | Rejection | None:
    return TagParser(config).parse(instance)
