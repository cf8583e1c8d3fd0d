"""A line-by-line port of net/netfilter/ipvs/ip_vs_mh.c (Linux 6.1), the oracle for bridge.core.maglev.

It shares nothing with the module under test except the scalar `hsiphash`, which the kernel's own test
vectors pin down, and it keeps the kernel's shape on purpose (a dest_setup record per real server, the
populate loop with its list walk and `dt_count`), so a reader can hold it next to the C source.  It is
also the "straightforward pure-Python loop" the benchmark compares against.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from bridge.core.maglev import HASH1_KEY, HASH2_KEY, Dest, address_key, hsiphash
from bridge.core.model import TABLE_SIZES


def hashkey(addr: int, port: int, key: tuple[int, int], offset: int) -> int:
    """ip_vs_mh_hashkey: v = offset + ntohs(port) + ntohl(addr_fold); hsiphash(&v, sizeof(v), key)."""
    v = (offset + port + addr) & 0xFFFFFFFF
    return hsiphash(struct.pack("<I", v), key)


@dataclass
class DestSetup:
    offset: int = 0
    skip: int = 0
    perm: int = 0
    turns: int = 0


def gcd_weight(dests: Sequence[Dest]) -> int:
    g = 0
    for dest in dests:
        weight = dest.last_weight
        if weight > 0:
            g = math.gcd(weight, g) if g > 0 else weight
    return g


def shift_weight(dests: Sequence[Dest], gcd: int, size: int) -> int:
    if gcd < 1:
        return 0
    weight = 0
    for dest in dests:
        weight = max(weight, dest.last_weight)
    mw = weight // gcd
    tab_bits = (TABLE_SIZES.index(size) + 8) // 2
    shift = mw.bit_length() - tab_bits
    return shift if shift >= 0 else 0


def permutate(dests: Sequence[Dest], size: int) -> tuple[list[DestSetup], int]:
    g = gcd_weight(dests)
    rshift = shift_weight(dests, g, size)
    setups: list[DestSetup] = []
    if g < 1:
        return setups, g
    for dest in dests:
        ds = DestSetup()
        ds.offset = hashkey(address_key(dest.address), dest.port, HASH1_KEY, 0) % size
        ds.skip = hashkey(address_key(dest.address), dest.port, HASH2_KEY, 0) % (size - 1) + 1
        ds.perm = ds.offset
        lw = dest.last_weight
        ds.turns = ((lw // g) >> rshift) or (1 if lw != 0 else 0)
        setups.append(ds)
    return setups, g


def populate(dests: Sequence[Dest], size: int) -> list[int]:
    """ip_vs_mh_populate, with list_head replaced by an index into `dests` (len(dests) = head)."""
    lookup = [-1] * size
    setups, g = permutate(dests, size)
    if g < 1:
        return lookup
    table = [False] * size
    head = len(dests)
    p = head
    n = 0
    dt_count = 0
    while n < size:
        if p == head:
            p = 0
        i = 0
        while p != head:
            ds = setups[i]
            if ds.turns < 1:
                p += 1
                i += 1
                continue
            c = ds.perm
            while table[c]:
                ds.perm += ds.skip
                if ds.perm >= size:
                    ds.perm -= size
                c = ds.perm
            table[c] = True
            lookup[c] = p
            n += 1
            if n == size:
                return lookup
            dt_count += 1
            if dt_count >= ds.turns:
                dt_count = 0
                p += 1
                i += 1
    return lookup


def is_unavailable(dest: Dest) -> bool:
    return dest.weight <= 0 or dest.overloaded


def get(dests: Sequence[Dest], lookup: Sequence[int], addr: str, port: int) -> int | None:
    """ip_vs_mh_get: the dest index, or None for "no destination available"."""
    size = len(lookup)
    h = hashkey(address_key(addr), port, HASH1_KEY, 0) % size
    dest = lookup[h]
    return None if dest < 0 or is_unavailable(dests[dest]) else dest


def get_fallback(dests: Sequence[Dest], lookup: Sequence[int], addr: str, port: int) -> int | None:
    size = len(lookup)
    key = address_key(addr)
    ihash = hashkey(key, port, HASH1_KEY, 0) % size
    dest = lookup[ihash]
    if dest < 0:
        return None
    if not is_unavailable(dests[dest]):
        return dest
    for offset in range(size):
        roffset = (offset + ihash) % size
        h = hashkey(key, port, HASH1_KEY, roffset) % size
        dest = lookup[h]
        if dest < 0:
            break
        if not is_unavailable(dests[dest]):
            return dest
    return None


def schedule(
    dests: Sequence[Dest], lookup: Sequence[int], addr: str, port: int, *, mh_port: bool, mh_fallback: bool
) -> int | None:
    """ip_vs_mh_schedule for a packet from addr:port (not an ICMP error, so the source is hashed)."""
    hash_port = port if mh_port else 0
    if mh_fallback:
        return get_fallback(dests, lookup, addr, hash_port)
    return get(dests, lookup, addr, hash_port)
