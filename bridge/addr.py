"""Fast IPv4 text <-> integer helpers. A catalog repeats the same few thousand addresses across 100,000
instances; `ipaddress` objects for each of them cost more than the rest of planning together."""

from __future__ import annotations

import socket
from functools import lru_cache


@lru_cache(maxsize=65536)
def ipv4_int(text: str) -> int:
    """The address as an integer; ValueError unless `text` is a strict dotted quad."""
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, TypeError):
        raise ValueError(f"{text!r} is not an IPv4 address") from None


def ipv4_text(value: int) -> str:
    return socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
