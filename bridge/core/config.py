"""Agent configuration: one YAML file, validated in full at start so a typo stops the agent with one
clear message instead of surfacing as a half-configured kernel later."""

from __future__ import annotations

import ipaddress
import re
import reprlib
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml

from bridge.core.addr import EndpointError, HostPort, IpValue, Url, check_readable, parse_host_port, parse_url
from bridge.core.allow import AllowList, PrefixError, collapse, parse_prefixes
from bridge.core.encap import (
    DEFAULT_GUE_PORT,
    ENCAPSULATIONS,
    GUE_CHECKSUMS,
    Encapsulation,
    Forwarding,
    GueChecksum,
    forwarding,
)
from bridge.core.model import TABLE_SIZES

KNOWN_FLAGS = ("mh-port", "mh-fallback")
Role = Literal["director", "backend"]
DataplaneMode = Literal["kernel", "shadow"]
VipNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A configuration problem, always naming the key."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def _show(value: object) -> str:
    """A value as an error message may quote it: bounded, so a huge value cannot make a huge message."""
    return _REPR.repr(value)


@dataclass(frozen=True)
class TunnelMapping:
    """Maps backend addresses onto tunnel addresses, keeping host bits, so every director derives the
    same real-server address (ip_vs_mh hashes it) without coordination."""

    backend: ipaddress.IPv4Network
    tunnel: ipaddress.IPv4Network

    def translate(self, address: int) -> int | None:
        mask = int(self.backend.netmask)
        if address & mask != int(self.backend.network_address):
            return None
        return int(self.tunnel.network_address) | (address & ~mask & 0xFFFFFFFF)


@dataclass(frozen=True)
class ConsulConfig:
    address: str = "http://127.0.0.1:8500"
    datacenter: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_server_name: str | None = None
    stale: bool = False
    wait: str = "5m"
    """How long a blocking query may wait in Consul (Consul's default 5m, its maximum 10m). Only the idle
    re-arm rate depends on it: 2,000 watched services at 5m are ~7 cheap requests a second."""
    service_name: str = "maglev-bridge"
    register: bool = True
    """Register the agent in Consul itself; false when a scheduler (Nomad) registers it already."""
    dns_address: str = "127.0.0.1:8600"
    """Consul's DNS interface, for `status --discover`."""
    max_connections: int = 8
    """The most HTTP connections the catalog watch opens to Consul, whatever the number of tagged services:
    the local agent allows 200 per client address (`limits.http_max_conns_per_client`) and Nomad, on the
    same host and address, needs its share."""


    def __post_init__(self) -> None:
        seconds = parse_wait(self.wait)
        if not 0 < seconds <= MAX_CONSUL_WAIT:
            raise ConfigError(f"consul.wait: {_show(self.wait)} must be above 0 and at most 10m (Consul's maximum)")
        if self.max_connections < MIN_CONSUL_CONNECTIONS:
            raise ConfigError(
                f"consul.max_connections: {self.max_connections} is too few: the catalog watch holds {CONSUL_FEEDS} "
                f"blocking queries and needs one more connection to fetch what changed and one to probe what may "
                f"have; set {MIN_CONSUL_CONNECTIONS} or more (default 8)")
        if self.max_connections > MAX_CONSUL_CONNECTIONS:
            raise ConfigError(
                f"consul.max_connections: {self.max_connections} is too many: more than {MAX_CONSUL_CONNECTIONS} "
                f"only takes connections from the other clients of the local Consul agent (Nomad among them; "
                f"200 per address by default); set at most {MAX_CONSUL_CONNECTIONS} (default 8)")

    @property
    def wait_seconds(self) -> float:
        return parse_wait(self.wait)

    @cached_property
    def url(self) -> Url:
        return parse_url("consul.address", self.address, 8500)

    @cached_property
    def dns(self) -> HostPort:
        return parse_host_port("consul.dns_address", self.dns_address, default_port=8600, literal=True)


MAX_CONSUL_WAIT = 600.0
CONSUL_FEEDS = 4
"""The catalog watch's blocking queries (bridge/catalog/consul.py): the service list, the critical and the
warning checks, the node list."""
MIN_CONSUL_CONNECTIONS = CONSUL_FEEDS + 2
"""The feeds, one connection to fetch what changed and one to probe what may have."""
MAX_CONSUL_CONNECTIONS = 64


def parse_wait(text: str) -> float:
    match = re.fullmatch(r"([0-9]{1,6}(?:\.[0-9]{1,3})?)(ms|s|m)", text, flags=re.ASCII)
    if match is None:
        raise ConfigError(f"consul.wait: {_show(text)} is not a duration like 30s or 5m")
    return float(match[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match[2]]


@dataclass(frozen=True)
class NomadConfig:
    address: str = "http://127.0.0.1:4646"
    region: str | None = None
    namespace: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_server_name: str | None = None
    jobs_dir: str = "jobs"
    keep_interval: float = 60.0
    """Seconds between re-plans of the management jobs by `run` (0 disables keeping)."""

    @cached_property
    def url(self) -> Url:
        return parse_url("nomad.address", self.address, 4646)


DIRECTOR_SYSCTLS: tuple[tuple[str, int], ...] = (
    ("net.ipv4.vs.expire_nodest_conn", 1),
    ("net.ipv4.vs.sloppy_tcp", 1),
)
"""What a director's promise depends on (README, "The director's sysctls"): sloppy_tcp lets a director
carry an established TCP flow it has never seen (a router moved it here) instead of passing the mid-stream
packet to the local stack, which resets it; expire_nodest_conn makes a connection whose real server was
deleted (after drain_timeout) fail at once instead of hanging until its IPVS entry times out."""
SYSCTL_PREFIX = "net.ipv4.vs."


@dataclass(frozen=True)
class BgpConfig:
    """Announcements: one blackhole host route (/32, /128 for an IPv6 VIP) per served VIP in `table`, which
    the operator's BIRD learns (a kernel protocol with `learn` per family) and exports; the agent never writes
    BIRD's configuration."""

    table: int = 245
    """A kernel routing table no `ip rule` consults: it only feeds BIRD."""
    maintenance_file: str = "/var/lib/maglev-bridge/maintenance"
    """Present = maintenance on. Kept on disk (not /run) on purpose: a director put in maintenance and
    rebooted must stay out of rotation until an operator says `maintenance off`."""
    bird_socket: str = "/run/bird/bird.ctl"
    """BIRD's control socket (Debian's bird2 default), read by /metrics for the BGP sessions' state."""

    def __post_init__(self) -> None:
        if not 1 <= self.table <= 252:
            raise ConfigError(f"bgp.table: expected a routing table from 1 to 252 (253-255 are the kernel's "
                              f"default, main and local), got {self.table!r}")


@dataclass(frozen=True)
class ConnSyncConfig:
    """IPVS connection synchronisation: the kernel's master and backup sync daemons on every director, so a
    connection to a draining (weight 0) backend survives its flow moving to another director."""

    interface: str = ""
    """The interface the sync messages go out and come in on (multicast 224.0.0.81:8848 by default)."""
    syncid: int = 0
    """Directors of one group share a syncid (0-255); a backup takes messages of its syncid only
    (0: any)."""

    def __post_init__(self) -> None:
        if not self.interface:
            raise ConfigError("conn_sync.interface: required (the interface the directors exchange sync messages on)")
        if not 0 <= self.syncid <= 255:
            raise ConfigError(f"conn_sync.syncid: expected an integer from 0 to 255, got {self.syncid!r}")


@dataclass(frozen=True)
class Config:
    role: Role = "director"
    dataplane: DataplaneMode = "kernel"
    vip_cidrs: tuple[VipNetwork, ...] = ()
    """IPv4 and IPv6 prefixes: the only VIPs the agent may serve or touch."""
    tunnel_map: tuple[TunnelMapping, ...] = ()
    local_address: str | None = None
    fou_port: int = 5555
    encapsulation: Encapsulation = "fou"
    """fou (ipip links with FOU, real servers at tunnel addresses) or gue (IPVS's own GUE tunnel forwarding to
    the backends' addresses): bridge/core/encap.py. The same on every director of a fleet."""
    standby_encapsulation: Encapsulation | None = None
    """`gue` on a `fou` director during a migration: every backend's gue real server is desired too, added and
    kept at weight 0 (no slot, the table does not change), so that the connections a switched director
    synchronises here have a real server of their own encapsulation (docs/gue-migration.md). Not `fou`: a
    `gue` director's fou real servers need links and routes the standby does not build."""
    retire_encapsulation: Encapsulation | None = None
    """`fou` on a `gue` director once every director of the fleet has switched (the runbook's last step): the
    real servers of that encapsulation the director no longer wants are deleted as soon as none of a virtual
    service's holds a connection entry, instead of at their drain deadline (docs/gue-migration.md). The
    director cannot know on its own that no peer is still `fou`, so it is the operator's statement."""
    gue_port: int = DEFAULT_GUE_PORT
    gue_checksum: GueChecksum = "none"
    receive: tuple[Encapsulation, ...] | None = None
    """The backend role's receivers: None means the one of `encapsulation`; both during a migration
    (README, "Moving a fleet from fou to gue")."""
    tag_prefix: str = "maglev"
    drain_timeout: float = 60.0
    resync_interval: float = 300.0
    default_flags: tuple[str, ...] = KNOWN_FLAGS
    default_allow: AllowList = None
    """The allow list of a virtual service whose instances tag none (None: everyone, no filter)."""
    warning_serves: bool = True
    route_protocol: int = 245
    mh_table_size: int = 4093
    """The kernel's ip_vs_mh table size (CONFIG_IP_VS_MH_TAB_INDEX; Debian's 6.1 kernels: 4093)."""
    link_prefix: str = "mgl"
    node_name: str = field(default_factory=socket.gethostname)
    catalog_file: str | None = None
    state_file: str = "/run/maglev-bridge/state.json"
    http_bind: str = "127.0.0.1:9119"
    rack: str | None = None
    consul: ConsulConfig | None = None
    nomad: NomadConfig | None = None
    sysctls: tuple[tuple[str, int], ...] = DIRECTOR_SYSCTLS
    """The director's sysctls (net.ipv4.vs.* of its network namespace), set and repaired by the agent; it
    never touches one that is not listed."""
    bgp: BgpConfig | None = None
    conn_sync: ConnSyncConfig | None = None

    @cached_property
    def _vip_masks(self) -> tuple[tuple[int, int, int], ...]:
        return tuple((net.version, int(net.netmask), int(net.network_address)) for net in self.vip_cidrs)

    def is_vip_allowed(self, address: IpValue) -> bool:
        family, value = address
        return any(family == version and value & mask == network for version, mask, network in self._vip_masks)

    @cached_property
    def http_address(self) -> HostPort:
        return parse_host_port("http_bind", self.http_bind, literal=True)

    @property
    def receivers(self) -> tuple[Encapsulation, ...]:
        return self.receive if self.receive is not None else (self.encapsulation,)

    @cached_property
    def forwarding(self) -> Forwarding:
        """What every real server of this director must have."""
        return forwarding(self.encapsulation, self.gue_port, self.gue_checksum)

    @cached_property
    def standby_forwarding(self) -> Forwarding | None:
        """What the standby real servers have (`standby_encapsulation`); None without them."""
        if self.standby_encapsulation is None:
            return None
        return forwarding(self.standby_encapsulation, self.gue_port, self.gue_checksum)

    def tunnel_address(self, backend: int) -> int | None:
        for mapping in self.tunnel_map:
            translated = mapping.translate(backend)
            if translated is not None:
                return translated
        return None


def _any_network(key: str, value: object) -> VipNetwork:
    try:
        return ipaddress.ip_network(str(value), strict=True)
    except ValueError as exc:
        raise ConfigError(f"{key}: {_show(value)} is not a network in CIDR form ({str(exc)[:120]})") from None


def _network(key: str, value: object) -> ipaddress.IPv4Network:
    net = _any_network(key, value)
    if not isinstance(net, ipaddress.IPv4Network):
        raise ConfigError(f"{key}: {_show(value)}: only IPv4 is supported")
    return net


def _list(key: str, value: object) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
    return value


def _tunnel_map(value: object) -> tuple[TunnelMapping, ...]:
    mappings = []
    for i, item in enumerate(_list("tunnel_map", value)):
        key = f"tunnel_map[{i}]"
        if not isinstance(item, Mapping) or set(item) != {"backend", "tunnel"}:
            raise ConfigError(f"{key}: expected {{backend: <cidr>, tunnel: <cidr>}}, got {_show(item)}")
        backend = _network(f"{key}.backend", item["backend"])
        tunnel = _network(f"{key}.tunnel", item["tunnel"])
        if backend.prefixlen != tunnel.prefixlen:
            raise ConfigError(
                f"{key}: backend /{backend.prefixlen} and tunnel /{tunnel.prefixlen} must have equal prefix lengths"
            )
        mappings.append(TunnelMapping(backend, tunnel))
    return tuple(mappings)


def _flags(value: object) -> tuple[str, ...]:
    flags = tuple(str(f) for f in _list("default_flags", value))
    unknown = [f for f in flags if f not in KNOWN_FLAGS]
    if unknown:
        raise ConfigError(f"default_flags: unknown flag(s) {unknown}; expected some of {list(KNOWN_FLAGS)}")
    return flags


def _default_allow(value: object) -> AllowList:
    """`default_allow: [<cidr>, ...]`; null or absent: everyone."""
    if value is None:
        return None
    try:
        return collapse(parse_prefixes(",".join(str(v) for v in _list("default_allow", value))))
    except PrefixError as err:
        raise ConfigError(f"default_allow: {err}") from None


def _number(key: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigError(f"{key}: expected a number from {low:g} to {high:g}, got {_show(value)}")
    return float(value)


def _integer(key: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{key}: expected an integer from {low} to {high}, got {_show(value)}")
    return value


def _choice(key: str, value: object, choices: tuple[Any, ...]) -> Any:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {list(choices)}, got {_show(value)}")
    return value


def _string(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {_show(value)}")
    return value


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
    return value


def _section(name: str, cls: Any, value: object) -> Any:
    """A nested section: known keys only; strings, except the booleans and numbers the class declares."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: expected a mapping, got {_show(value)}")
    types = {f.name: f.type for f in fields(cls)}
    unknown = [key for key in value if key not in types]
    if unknown:
        raise ConfigError(f"{name}.{_show(unknown[0]).strip(chr(39))}: unknown key; known keys are {sorted(types)}")
    parsed: dict[str, Any] = {}
    for key, item in value.items():
        if types[key] == "bool":
            parsed[key] = _bool(f"{name}.{key}", item)
        elif types[key] == "float":
            parsed[key] = _number(f"{name}.{key}", item, 0, 86400)
        elif types[key] == "int":
            parsed[key] = _integer(f"{name}.{key}", item, 0, 2**31 - 1)
        elif item is not None:
            parsed[key] = _string(f"{name}.{key}", item)
    section = cls(**parsed)
    if isinstance(section, ConsulConfig | NomadConfig):
        _check_client(name, section)
    return section


def _check_client(name: str, section: ConsulConfig | NomadConfig) -> None:
    """What the Consul and Nomad clients would otherwise find out only when they first connect (inside a
    watch thread, while /health still looked fine): the address they can dial, the files they will open."""
    url = section.url
    if isinstance(section, ConsulConfig):
        _ = section.dns
    for key in ("token_file", "ca_file", "cert_file", "key_file"):
        path = getattr(section, key)
        if path is not None:
            check_readable(f"{name}.{key}", path)
    if bool(section.cert_file) != bool(section.key_file):
        given, missing = ("cert_file", "key_file") if section.cert_file else ("key_file", "cert_file")
        raise ConfigError(f"{name}.{missing}: {name}.{given} is set, so a client certificate needs both")
    tls = [key for key in ("ca_file", "cert_file", "tls_server_name") if getattr(section, key)]
    if tls and url.scheme != "https":
        raise ConfigError(f"{name}.address: {tls[0]} is set but {url.text} is not https://; TLS settings need https")


def _receive(value: object) -> tuple[Encapsulation, ...]:
    """`receive: [fou, gue]`: the backend's receivers, each at most once."""
    items = _list("receive", value)
    if not items:
        raise ConfigError(f"receive: expected a list of some of {list(ENCAPSULATIONS)}, got an empty list")
    found = tuple(_choice(f"receive[{i}]", item, ENCAPSULATIONS) for i, item in enumerate(items))
    if len(set(found)) != len(found):
        raise ConfigError(f"receive: {list(found)} names an encapsulation twice")
    return found


def _check_ports(values: Mapping[str, Any]) -> None:
    """A receiver's UDP port is either FOU or GUE (the kernel's fou module keeps one type per port)."""
    receive = values.get("receive") or (values.get("encapsulation", "fou"),)
    fou_port, gue_port = values.get("fou_port", 5555), values.get("gue_port", DEFAULT_GUE_PORT)
    if set(receive) == set(ENCAPSULATIONS) and fou_port == gue_port:
        raise ConfigError(f"gue_port: {gue_port} is also fou_port; a backend receiving both needs two ports "
                          "(one UDP port is either FOU or GUE, never both)")


def _check_standby(values: Mapping[str, Any]) -> None:
    """The standby real servers are the other encapsulation's; only gue ones on a fou director exist."""
    standby = values.get("standby_encapsulation")
    encapsulation = values.get("encapsulation", "fou")
    if standby is None:
        return
    if standby == encapsulation:
        raise ConfigError(f"standby_encapsulation: {standby} is also encapsulation; the standby real servers are "
                          "the other encapsulation's (gue on a fou director during a migration)")
    if standby != "gue":
        raise ConfigError(f"standby_encapsulation: {standby} is not supported: only gue standby real servers on a "
                          "fou director (fou ones would need the links and routes of a fou director)")


def _check_retire(values: Mapping[str, Any]) -> None:
    """Only what the director no longer wants can retire: not its own encapsulation, not its standby's."""
    retire = values.get("retire_encapsulation")
    for key in ("encapsulation", "standby_encapsulation"):
        if retire is not None and retire == values.get(key, "fou" if key == "encapsulation" else None):
            raise ConfigError(f"retire_encapsulation: {retire} is also {key}; only the real servers of an "
                              "encapsulation the director no longer uses retire (fou on a gue director after "
                              "the switch)")


def _sysctls(value: object) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"sysctls: expected a mapping of sysctl name to integer, got {_show(value)}")
    found = []
    for name, item in value.items():
        if not isinstance(name, str) or not re.fullmatch(re.escape(SYSCTL_PREFIX) + r"[a-z0-9_]+", name):
            raise ConfigError(f"sysctls: {_show(name)}: only IPVS sysctls of the director's namespace "
                              f"({SYSCTL_PREFIX}<name>) are managed")
        found.append((name, _integer(f"sysctls.{name}", item, 0, 2**31 - 1)))
    return tuple(sorted(found))


_PARSERS: dict[str, Any] = {
    "role": lambda v: _choice("role", v, ("director", "backend")),
    "dataplane": lambda v: _choice("dataplane", v, ("kernel", "shadow")),
    "vip_cidrs": lambda v: tuple(_any_network(f"vip_cidrs[{i}]", n) for i, n in enumerate(_list("vip_cidrs", v))),
    "tunnel_map": _tunnel_map,
    "local_address": lambda v: str(ipaddress.IPv4Address(_string("local_address", v))),
    "fou_port": lambda v: _integer("fou_port", v, 1, 65535),
    "encapsulation": lambda v: _choice("encapsulation", v, ENCAPSULATIONS),
    "standby_encapsulation": lambda v: _choice("standby_encapsulation", v, ENCAPSULATIONS),
    "retire_encapsulation": lambda v: _choice("retire_encapsulation", v, ENCAPSULATIONS),
    "gue_port": lambda v: _integer("gue_port", v, 1, 65535),
    "gue_checksum": lambda v: _choice("gue_checksum", v, GUE_CHECKSUMS),
    "receive": _receive,
    "tag_prefix": lambda v: _string("tag_prefix", v),
    "drain_timeout": lambda v: _number("drain_timeout", v, 0, 86400),
    "resync_interval": lambda v: _number("resync_interval", v, 1, 86400),
    "default_flags": _flags,
    "default_allow": _default_allow,
    "warning_serves": lambda v: _bool("warning_serves", v),
    "route_protocol": lambda v: _integer("route_protocol", v, 5, 254),
    "mh_table_size": lambda v: _choice("mh_table_size", v, TABLE_SIZES),
    "link_prefix": lambda v: _string("link_prefix", v),
    "node_name": lambda v: _string("node_name", v),
    "catalog_file": lambda v: _string("catalog_file", v),
    "state_file": lambda v: _string("state_file", v),
    "http_bind": lambda v: parse_host_port("http_bind", _string("http_bind", v), literal=True).netloc,
    "rack": lambda v: _string("rack", v),
    "consul": lambda v: _section("consul", ConsulConfig, v),
    "nomad": lambda v: _section("nomad", NomadConfig, v),
    "sysctls": _sysctls,
    "bgp": lambda v: _section("bgp", BgpConfig, {} if v is None else v),  # `bgp:` alone: the defaults
    "conn_sync": lambda v: _section("conn_sync", ConnSyncConfig, v),
}


def parse_config(raw: object) -> Config:
    """Validate a decoded YAML document; every error names the key at fault."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"configuration: expected a mapping of keys, got {type(raw).__name__}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        parser = _PARSERS.get(key) if isinstance(key, str) else None
        if parser is None:
            raise ConfigError(f"{_show(key).strip(chr(39))}: unknown key; known keys are {sorted(_PARSERS)}")
        try:
            values[key] = parser(value)
        except ConfigError:
            raise
        except EndpointError as exc:
            raise ConfigError(str(exc)) from None
        except ValueError as exc:
            raise ConfigError(f"{key}: {str(exc)[:200]}") from None
    link_prefix = values.get("link_prefix", "mgl")
    if len(link_prefix) > 7:
        raise ConfigError(
            f"link_prefix: {_show(link_prefix)} is too long; at most 7 characters (links are <prefix><8 hex>)")
    _check_prefixes(values.get("tunnel_map", ()), values.get("vip_cidrs", ()))
    _check_ports(values)
    _check_standby(values)
    _check_retire(values)
    return Config(**values)


def _check_prefixes(tunnel_map: tuple[TunnelMapping, ...], vip_cidrs: tuple[VipNetwork, ...]) -> None:
    """Prefixes that would make two directors, or two backends, disagree silently: a backend in two
    mappings (the first would win), two backends on one tunnel address, a tunnel address that is also an
    underlay or VIP address (its /32 route through the tunnel would capture the underlay's or the VIP's
    traffic; a tunnel to a backend routed through itself loops). Prefixes of different families never overlap."""
    named: list[tuple[str, str, VipNetwork]] = [
        (f"tunnel_map[{i}].{side}", side, getattr(m, side)) for i, m in enumerate(tunnel_map)
        for side in ("backend", "tunnel")]
    named += [(f"vip_cidrs[{i}]", "vip", net) for i, net in enumerate(vip_cidrs)]
    why = {
        ("backend", "backend"): "a backend address would map to two tunnel addresses",
        ("tunnel", "tunnel"): "two backends would share a tunnel address",
        ("backend", "tunnel"): "tunnel addresses are routed through the tunnels and must not be backend addresses",
        ("backend", "vip"): "a backend address inside vip_cidrs would be routed locally on every director",
        ("tunnel", "vip"): "a tunnel address inside vip_cidrs would be routed locally on every director",
    }
    for j, (key, side, net) in enumerate(named):
        for other_key, other_side, other in named[:j]:
            reason = why.get((other_side, side)) or why.get((side, other_side))
            if reason and net.overlaps(other):
                raise ConfigError(f"{key}: {net} overlaps {other_key} {other}: {reason}")


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_PlainLoader)  # a SafeLoader without aliases
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc)[:300]}") from None
    return parse_config(raw)


class _PlainLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases: a 400-byte file of nested aliases ("billion laughs")
    expands to gigabytes when a value is printed or walked; no key of this file needs one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: YAML aliases (*{str(event.anchor)[:40]}) are "
                                 "not supported in this file; write the value out")
        return super().compose_node(parent, index)
