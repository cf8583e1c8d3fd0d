"""The names of what the agent manages: a virtual service (`ServiceKey`) and a real server in it (`DestKey`).

Each key is the one place its text form is written and read back, as kube-proxy's `VirtualServer.String()`
is: "198.51.100.10:80/tcp" and "198.51.100.10:80/tcp>203.0.113.11:8080" appear in plans, status, /metrics,
nftables comments, `explain` and the state file, and are parsed only by `parse` here.

NamedTuples rather than dataclasses: the planner makes one per virtual service and per draining or weight-0
real server of a 100,000-instance catalog, the state file one per remembered weight, and a NamedTuple is the
cheapest immutable, hashable value Python has (its hash and comparisons run in C). Their order is the
tuple's (VIP as text, then port, then protocol), the order every sorted output already had; `listing_order`
is the kernel's (VIP as a number).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

from bridge.core.addr import ascii_number, ipv4_int

Protocol = Literal["tcp", "udp"]
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp")
SERVICE_FORM = "<ipv4>:<port>/<tcp|udp>"
DEST_FORM = f"{SERVICE_FORM}><ipv4>:<port>"


def _address_port(text: str, part: str, expected: str) -> tuple[str, int]:
    """`<ipv4>:<port>`; ValueError naming `text`, the part at fault and the form `expected`."""
    host, colon, port_text = part.partition(":")
    if not colon:
        raise ValueError(f"{text!r}: no port after {host!r}; expected {expected}")
    try:
        ipv4_int(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IPv4 address; expected {expected}") from None
    port = ascii_number(port_text, 65535)
    if not port:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number from 1 to 65535; expected {expected}")
    return host, port


class ServiceKey(NamedTuple):
    """A virtual service: VIP, port and protocol, as IPVS names it."""

    vip: str
    port: int
    protocol: Protocol

    def __str__(self) -> str:
        return f"{self.vip}:{self.port}/{self.protocol}"

    @property
    def text(self) -> str:
        """"vip:port/proto": the one text form (also what `str()` and f-strings give)."""
        return str(self)

    def listing_order(self) -> tuple[int, int, str]:
        """The order the kernel lists services in and `plan`/`status` print them: VIP as a number."""
        return (ipv4_int(self.vip), self.port, self.protocol)

    @classmethod
    def parse(cls, text: str, *, default_protocol: Protocol | None = None) -> ServiceKey:
        """The key `text` names; ValueError saying what is wrong and what was expected. With a
        `default_protocol`, "/proto" may be left out (what `explain` accepts)."""
        return _service(text, text, "<ipv4>:<port>[/tcp|/udp]" if default_protocol else SERVICE_FORM,
                        default_protocol)


class DestKey(NamedTuple):
    """A real server of a virtual service: what the agent remembers a weight and a drain deadline for."""

    service: ServiceKey
    address: str
    port: int

    def __str__(self) -> str:
        s = self.service
        return f"{s.vip}:{s.port}/{s.protocol}>{self.address}:{self.port}"

    @property
    def text(self) -> str:
        """"vip:port/proto>address:port" (also what `str()` and f-strings give)."""
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
    """`<ipv4>:<port>/<tcp|udp>` in `part` of `text`; ValueError naming `text` and the form `expected`."""
    rest, slash, protocol = part.partition("/")
    if not slash:
        if default_protocol is None:
            raise ValueError(f"{text!r}: no protocol after {rest!r}; expected {expected}")
        protocol = default_protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"{text!r}: protocol {protocol!r} is not tcp or udp; expected {expected}")
    vip, port = _address_port(text, rest, expected)
    return ServiceKey(vip, port, "udp" if protocol == "udp" else "tcp")
