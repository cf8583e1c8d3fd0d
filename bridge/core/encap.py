"""How a director's packets reach a backend: the two encapsulations and what each costs on the wire.

`fou`: the real server is the backend's tunnel address (tunnel_map), IPVS forwards by direct routing, and a
per-backend ipip link with FOU encapsulation and a /32 route carry the packet (the seed's design).
`gue`: the real server is the backend's own address, and IPVS encapsulates the packet itself (tunnel
forwarding, `IPVS_DEST_ATTR_TUN_TYPE` = GUE, since Linux 5.2): no link, no route per backend.

The real-server address differs between the two, and ip_vs_mh hashes it, so the Maglev tables of a `fou`
director and a `gue` director differ: every director of a fleet must use the same encapsulation (the README's
migration runbook says how to move a fleet from one to the other).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from bridge.core.addr import ip_value

Encapsulation = Literal["fou", "gue"]
ENCAPSULATIONS: tuple[Encapsulation, ...] = ("fou", "gue")
GueChecksum = Literal["none", "csum", "remcsum"]
GUE_CHECKSUMS: tuple[GueChecksum, ...] = ("none", "csum", "remcsum")
"""ipvsadm's --tun-nocsum, --tun-csum, --tun-remcsum (IP_VS_TUNNEL_ENCAP_FLAG_*): none sends a zero UDP checksum
(the inner packet keeps its own); csum fills the outer UDP checksum; remcsum adds GUE's remote checksum offload
option (4 more bytes on packets whose checksum is left to offload)."""
DEFAULT_GUE_PORT = 6080
"""The port ipvsadm's manual uses for GUE (`--tun-port 6080`, `ip fou add port 6080 gue`); kept apart from FOU's
5555 because one UDP port of a receiver is either FOU or GUE, never both."""

OUTER_IPV4 = 20
OUTER_IPV6 = 40
UDP = 8
GUE_HEADER = 4
OUTER: dict[int, int] = {4: OUTER_IPV4, 6: OUTER_IPV6}
ENCAP_HEADERS: dict[Encapsulation, int] = {"fou": UDP, "gue": UDP + GUE_HEADER}
"""Bytes each encapsulation adds after the outer IP header: FOU puts the inner IP packet right after the UDP
header (8); GUE adds its 4-byte header (12; remcsum adds 4 more where it applies). With the outer header: 28 and
32 over an IPv4 underlay, 52 for GUE over an IPv6 one (`gue` mode's IPv6 backends; fou carries IPv4 only)."""


def overhead(encapsulation: Encapsulation, outer: int = 4) -> int:
    """Bytes the encapsulation adds to a packet whose outer header is of IP version `outer`."""
    return OUTER[outer] + ENCAP_HEADERS[encapsulation]


INNER_MTU = 1500
"""The packet size the clients' side of the internet uses: what the underlay must carry inside the tunnel."""


@dataclass(frozen=True)
class Forwarding:
    """How IPVS sends a real server's packets (IPVS_DEST_ATTR_FWD_METHOD and the tunnel attributes), as the
    kernel reports it: the planner compares it so that a real server in the wrong mode, port or checksum
    setting is corrected, and a draining one keeps the forwarding it has."""

    method: str = "route"
    """route (direct routing), tunnel, masq, local or bypass."""
    tunnel: str = "ipip"
    """With `tunnel`: ipip, gue or gre (IP_VS_CONN_F_TUNNEL_TYPE_*)."""
    port: int = 0
    checksum: GueChecksum = "none"

    def describe(self) -> str:
        if self.method != "tunnel":
            return self.method
        if self.tunnel != "gue":
            return f"tunnel {self.tunnel}"
        return f"gue port {self.port}" + ("" if self.checksum == "none" else f" {self.checksum}")

    @cached_property
    def via(self) -> str:
        """What an operation's description says of it: " via <describe()>", nothing for direct routing. Cached:
        a full apply describes thousands of real servers, each with the director's one forwarding object."""
        return "" if self == DIRECT_ROUTING else f" via {self.describe()}"


DIRECT_ROUTING = Forwarding()


def forwarding(encapsulation: Encapsulation, gue_port: int, gue_checksum: GueChecksum) -> Forwarding:
    """What every real server of a director in this mode must have."""
    if encapsulation == "gue":
        return Forwarding("tunnel", "gue", gue_port, gue_checksum)
    return DIRECT_ROUTING


def encapsulation_of(found: Forwarding) -> Encapsulation | None:
    """The encapsulation a live real server's forwarding belongs to: direct routing is `fou`'s (the links carry
    it), GUE tunnel forwarding `gue`'s; anything else is neither (the agent never makes it)."""
    if found.method == "route":
        return "fou"
    if found.method == "tunnel" and found.tunnel == "gue":
        return "gue"
    return None


def mtu_problem(encapsulation: Encapsulation, interface: str, mtu: int, outer: int = 4) -> str | None:
    """A warning when the underlay cannot carry a full-size client packet in this encapsulation (outer header
    of IP version `outer`) without fragmenting (a director does not fragment for its clients: large packets of
    a DF flow are lost until PMTU discovery, which DSR's asymmetric path often breaks). None when it can."""
    added = overhead(encapsulation, outer)
    needed = INNER_MTU + added
    if mtu >= needed:
        return None
    underlay = "underlay" if outer == 4 else "IPv6 underlay"
    return (f"{underlay} MTU {mtu} on {interface} cannot carry {INNER_MTU}-byte packets in {encapsulation} "
            f"encapsulation (+{added} bytes): raise it to {needed} or more, or clamp the "
            f"clients' MSS to {mtu - added - 40}")


def ipv6_underlay(addresses: Iterable[str]) -> str | None:
    """The IPv6 real server (the lowest) whose route the MTU check of the IPv6 underlay follows, or None when
    every real server is IPv4: IPv6 real-server addresses exist only in `gue` mode, as IPv6 backends."""
    found = [ip_value(a) for a in addresses if ":" in a]
    return str(ipaddress.IPv6Address(min(found).value)) if found else None
