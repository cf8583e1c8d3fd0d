"""The names of what the agent manages: a virtual service (`ServiceKey`) and a real server in it (`DestKey`).

Each key is the one place its text form is written and read back, as kube-proxy's `VirtualServer.String()`
is: "198.51.100.10:80/tcp" and "198.51.100.10:80/tcp>203.0.113.11:8080" appear in plans, status, /metrics,
nftables comments, `explain` and the state file, and are parsed only by `parse` here. IPv6 addresses stand in
brackets, as URLs write them ("[2001:db8::10]:80/tcp>203.0.113.11:8080": an IPv6 VIP may have IPv4 real
servers, reached by tunnel forwarding), and are held in their canonical form (compressed, lowercase), which
`parse` produces from any spelling.

NamedTuples rather than dataclasses: the planner makes one per virtual service and per draining or weight-0
real server of a 100,000-instance catalog, the state file one per remembered weight, and a NamedTuple is the
cheapest immutable, hashable value Python has (its hash and comparisons run in C). Their order is the
tuple's (VIP as text, then port, then protocol), the order every sorted output already had; `listing_order`
is IPv4 before IPv6 (as `ipvsadm -Ln` sorts families), then the VIP as a number.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

from bridge.core.addr import IpValue, ascii_number, bracketed, canonical_ip, ip_value, split_host_port

Protocol = Literal["tcp", "udp"]
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp")
SERVICE_FORM = "<vip>:<port>/<tcp|udp> (IPv6 in brackets: [2001:db8::10]:80/tcp)"
DEST_FORM = "<vip>:<port>/<tcp|udp>><address>:<port> (IPv6 in brackets: [2001:db8::10]:80/tcp>[2001:db8::1]:80)"


def _address_port(text: str, part: str, expected: str) -> tuple[str, int]:
    """`<ipv4>:<port>` or `[<ipv6>]:<port>`; the address in its canonical form; ValueError naming `text`, the
    part at fault and the form `expected`."""
    try:
        host, colon, port_text = split_host_port(part)
    except ValueError:
        raise ValueError(f"{text!r}: {part!r} is not <ipv4>:<port> or [<ipv6>]:<port>; expected {expected}") from None
    if not colon:
        raise ValueError(f"{text!r}: no port after {part!r}; expected {expected}")
    try:
        address = canonical_ip(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IPv4 or IPv6 address; expected {expected}") from None
    port = ascii_number(port_text, 65535)
    if not port:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number from 1 to 65535; expected {expected}")
    return address, port


class ServiceKey(NamedTuple):
    """A virtual service: VIP, port and protocol, as IPVS names it. `vip` is canonical text without brackets
    (`canonical_ip`): whoever builds a key from other text canonicalises it first."""

    vip: str
    port: int
    protocol: Protocol

    def __str__(self) -> str:
        return f"{bracketed(self.vip)}:{self.port}/{self.protocol}"

    @property
    def text(self) -> str:
        """"vip:port/proto" ("[vip]:port/proto" for IPv6): the one text form (also what `str()` and f-strings
        give)."""
        return str(self)

    def listing_order(self) -> tuple[IpValue, int, str]:
        """The order `plan`/`status` print services in: IPv4 before IPv6, as `ipvsadm -Ln` sorts families
        (libipvs `ipvs_cmp_services`: address family, then protocol, then address, then port), then the VIP as
        a number, port, protocol, which keeps one VIP's services together where ipvsadm lists all TCP first.
        (The kernel's own netlink dump walks a hash table, in no useful order.)"""
        return (ip_value(self.vip), self.port, self.protocol)

    @property
    def family(self) -> int:
        """4 or 6: the VIP's address family."""
        return ip_value(self.vip).family

    @classmethod
    def parse(cls, text: str, *, default_protocol: Protocol | None = None) -> ServiceKey:
        """The key `text` names; ValueError saying what is wrong and what was expected. With a
        `default_protocol`, "/proto" may be left out (what `explain` accepts)."""
        return _service(text, text, "<vip>:<port>[/tcp|/udp] (IPv6 in brackets)" if default_protocol else SERVICE_FORM,
                        default_protocol)


class DestKey(NamedTuple):
    """A real server of a virtual service: what the agent remembers a weight and a drain deadline for."""

    service: ServiceKey
    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.service}>{bracketed(self.address)}:{self.port}"

    @property
    def text(self) -> str:
        """"vip:port/proto>address:port", IPv6 addresses in brackets (also what `str()` and f-strings give)."""
        return str(self)

    @classmethod
    def parse(cls, text: str) -> DestKey:
        """The key `text` names; ValueError saying what is wrong and what was expected."""
        service, arrow, dest = text.partition(">")
        if not arrow:
            raise ValueError(f"{text!r}: no '>' between virtual service and real server; expected {DEST_FORM}")
        address, port = _address_port(text, dest, DEST_FORM)
        return cls(_service(text, service, DEST_FORM), address, port)


def dest_key_parser() -> Callable[[str], DestKey]:
    """`DestKey.parse` for a batch of keys that share their parts, as a state file's do (10,000 remembered
    weights name 500 virtual services and 20 real servers): each distinct part is checked once and a key whose
    two parts were both seen is put together from them; any other key is parsed, and refused, by `parse`.
    Parsing every key in full cost `apply` ~0.27 s of its ~4 s in the test VM for one read of such a file,
    against ~0.1 s this way."""
    services: dict[str, ServiceKey] = {}
    dests: dict[str, tuple[str, int]] = {}

    def parse(text: str) -> DestKey:
        service_text, _, dest_text = text.partition(">")
        service = services.get(service_text)
        dest = dests.get(dest_text)
        if service is None or dest is None:
            key = DestKey.parse(text)
            service = services[service_text] = key.service
            dest = dests[dest_text] = (key.address, key.port)
        return DestKey(service, dest[0], dest[1])

    return parse


def _service(text: str, part: str, expected: str, default_protocol: Protocol | None = None) -> ServiceKey:
    """`<address>:<port>/<tcp|udp>` in `part` of `text`; ValueError naming `text` and the form `expected`."""
    rest, slash, protocol = part.partition("/")
    if not slash:
        if default_protocol is None:
            raise ValueError(f"{text!r}: no protocol after {rest!r}; expected {expected}")
        protocol = default_protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"{text!r}: protocol {protocol!r} is not tcp or udp; expected {expected}")
    vip, port = _address_port(text, rest, expected)
    return ServiceKey(vip, port, "udp" if protocol == "udp" else "tcp")
