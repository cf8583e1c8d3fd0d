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
