"""Source allow lists: which client prefixes may reach a virtual service.

An allow list is a tuple of prefixes in CIDR text, merged (no prefix inside another, adjacent ones joined)
and sorted, so two directors that read the same tags hold equal values and the nftables set they build is
equal element for element. `None` means "everyone": no filter at all for that service, which is also what
a list covering the whole address space becomes (a rule that can never drop is not worth a rule).

IPv4 only for now. The shape is ready for IPv6: prefixes are kept as text, and `collapse` groups by
family, so an IPv6 service would get its own `ip6 saddr` set without a change to the data.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

AllowList = tuple[str, ...] | None
Network = ipaddress.IPv4Network


class PrefixError(ValueError):
    """A prefix that is not an IPv4 network in CIDR form; the message says which and why."""


def parse_prefixes(text: str) -> tuple[Network, ...]:
    """A comma list of IPv4 prefixes. Host bits must be zero (`10.0.0.1/8` is a typo more often than a
    wish), and an empty list is refused: an instance that tags `allow=` most likely lost its value, and an
    empty list would silently drop every client."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise PrefixError("expected a comma list of IPv4 prefixes (<ipv4>/<length>), got nothing")
    found = []
    for item in items:
        if not item:
            raise PrefixError(f"empty prefix in {text!r}")
        try:
            network = ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            raise PrefixError(f"{item!r} is not a prefix in CIDR form ({str(exc)[:80]})") from None
        if not isinstance(network, Network):
            raise PrefixError(f"{item!r}: IPv6 source prefixes are not supported yet")
        found.append(network)
    return tuple(found)


def collapse(networks: Iterable[Network]) -> AllowList:
    """The canonical list: merged, sorted, None when it admits everyone."""
    merged = tuple(ipaddress.collapse_addresses(networks))
    if any(n.prefixlen == 0 for n in merged):
        return None
    return tuple(str(n) for n in merged)


def admits(allow: AllowList, source: str) -> bool:
    """True when `source` (an IPv4 address) may reach a service with this list."""
    if allow is None:
        return True
    address = ipaddress.IPv4Address(source)
    return any(address in ipaddress.IPv4Network(prefix) for prefix in allow)


def describe(allow: AllowList) -> str:
    return "everyone" if allow is None else ",".join(allow)
