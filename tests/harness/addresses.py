"""The kernel test bed's address plan: documentation ranges only, and nothing leaves the VM (its root
namespace has no default route).  Node i of each kind has a fixed address, so a failure message or a
capture reads the same in every run."""

from __future__ import annotations

UNDERLAY_NET = "192.0.2.0/24"
VIP_NET = "198.51.100.0/24"
CLIENT_NET = "203.0.113.0/24"
FOU_PORT = 5555
ROUTER_ADDRESS, ROUTER_CLIENT_ADDRESS = "192.0.2.1", "203.0.113.1"


def vip(i: int = 1) -> str:
    return f"198.51.100.{i}"


def director_address(i: int) -> str:
    return f"192.0.2.{10 + i}"


def backend_address(i: int) -> str:
    return f"192.0.2.{20 + i}"


def client_address(i: int) -> str:
    return f"203.0.113.{10 + i}"


def tunnel_address(i: int) -> str:
    return f"203.0.113.{100 + i}"


# IPv6, in the routed topology (Topology(routed=True)) only: the same plan inside 2001:db8::/32, so node i's
# IPv6 address ends as its IPv4 one (d1 192.0.2.11 and 2001:db8:2::11).
UNDERLAY6_NET = "2001:db8:2::/64"
VIP6_NET = "2001:db8:10::/64"
CLIENT6_NET = "2001:db8:113::/64"
ROUTER_ADDRESS6, ROUTER_CLIENT_ADDRESS6 = "2001:db8:2::1", "2001:db8:113::1"


def vip6(i: int = 1) -> str:
    return f"2001:db8:10::{i}"


def director_address6(i: int) -> str:
    return f"2001:db8:2::{10 + i}"


def backend_address6(i: int) -> str:
    return f"2001:db8:2::{20 + i}"


def client_address6(i: int) -> str:
    return f"2001:db8:113::{10 + i}"
