"""Source allow lists: which client prefixes may reach a virtual service.

An allow list is a tuple of prefixes in CIDR text, merged (no prefix inside another, adjacent ones joined)
and sorted, IPv4 before IPv6, so two directors that read the same tags hold equal values and the nftables set
they build is equal element for element. `None` means "everyone": no filter at all for that service.

An instance's list (its allow tags, or `default_allow`) may hold prefixes of both families, since one instance
may claim an IPv4 and an IPv6 VIP. Each virtual service takes the prefixes of its VIP's family
(`for_family`): a client of the other family can never reach the VIP, so those prefixes could only ever mean
"nobody". A list that names no prefix of a claimed VIP's family rejects the claim (bridge/core/tags.py)
rather than silently dropping every client of that VIP; `::/0` (or `0.0.0.0/0`) is how a list says "every
client of this family", and makes that family's list None (a rule that can never drop is not worth a rule).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

AllowList = tuple[str, ...] | None
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}


class PrefixError(ValueError):
    """A prefix that is not an IPv4 or IPv6 network in CIDR form; the message says which and why."""


def parse_prefixes(text: str) -> tuple[Network, ...]:
    """A comma list of IPv4 and IPv6 prefixes. Host bits must be zero (`10.0.0.1/8` is a typo more often than
    a wish), and an empty list is refused: an instance that tags `allow=` most likely lost its value, and an
    empty list would silently drop every client."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise PrefixError("expected a comma list of prefixes (<ipv4>/<length> or <ipv6>/<length>), got nothing")
    found = []
    for item in items:
        if not item:
            raise PrefixError(f"empty prefix in {text!r}")
        try:
            found.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise PrefixError(f"{item!r} is not a prefix in CIDR form ({str(exc)[:80]})") from None
    return tuple(found)


def collapse(networks: Iterable[Network]) -> AllowList:
    """The canonical list: merged per family, IPv4 first, each sorted; None when it admits everyone of both
    families."""
    nets = list(networks)
    merged: list[Network] = [
        *ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv4Network)),
        *ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv6Network)),
    ]
    if {n.version for n in merged if n.prefixlen == 0} == {4, 6}:
        return None
    return tuple(str(n) for n in merged)


def for_family(allow: AllowList, family: int) -> AllowList:
    """The list a virtual service of address family `family` (4 or 6) gets from an instance's list: its
    prefixes of that family, None when they cover the whole family (or the list is None). An empty tuple
    means the list names none of that family: the caller rejects the claim (see the module docstring)."""
    if allow is None:
        return None
    mine = tuple(p for p in allow if (":" in p) == (family == 6))
    return None if any(p.endswith("/0") for p in mine) else mine


def admits(allow: AllowList, source: str) -> bool:
    """True when `source` (an IPv4 or IPv6 address) may reach a service with this list."""
    if allow is None:
        return True
    address = ipaddress.ip_address(source)
    return any(address.version == net.version and address in net for net in map(ipaddress.ip_network, allow))


def describe(allow: AllowList) -> str:
    return "everyone" if allow is None else ",".join(allow)
