"""A bit-exact model of the kernel's Maglev scheduler, `net/netfilter/ipvs/ip_vs_mh.c` (Linux 6.1).

The agent cannot ask the kernel which real server a client will reach, yet operators need to know it
(`explain`), two directors must agree on it (`fingerprint`), and weights only approximate what the
table really gives each server (`shares`).  So the table is rebuilt here exactly as the kernel builds
it, from the same inputs, in the same order:

* Real servers are taken in kernel list order, head first.  IPVS adds a new real server at the *head*
  of the list (`list_add_rcu` in `__ip_vs_update_dest`, also when one comes back from the trash), so
  the list is newest-first; the netlink dump of a service's destinations walks it in that order.
* Everything is built from `last_weight`, the last non-zero weight the kernel remembers.  A real server
  *added* with weight 0 has `last_weight` 0 and gets no slots; one *edited* to weight 0 keeps its
  slots, and lookups that land on them either fail (no `mh-fallback`) or are re-hashed.
* Hashes are the 64-bit kernel's `hsiphash`, which is SipHash-1-3 with a 64-bit key word per half
  (32-bit kernels run HalfSipHash-1-3 instead and build different tables; they are not modelled).
* The table size and the weight scaling both follow `CONFIG_IP_VS_MH_TAB_INDEX`; Debian's 6.1 kernels
  use the default 12, a table of 4093 slots.

The kernel fills its table one claim at a time, a serial loop that no numpy formulation beats for
weighted servers; for big tables `build_table` runs that same loop compiled with numba (see "Population").
"""

from __future__ import annotations

import hashlib
import math
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache, reduce

import numpy as np
import numpy.typing as npt

from bridge.core.addr import bracketed
from bridge.core.model import TABLE_SIZES

IntArray = npt.NDArray[np.int64]
U64Array = npt.NDArray[np.uint64]

DEFAULT_TABLE_SIZE = 4093
"""CONFIG_IP_VS_MH_TAB_INDEX=12, the Kconfig default, which Debian's 6.1 kernels keep."""

HASH1_KEY = (2654435761, 2654435761)
"""`generate_hash_secret`: the key for a real server's offset and for every lookup."""
HASH2_KEY = (2654446892, 2654446892)
"""`generate_hash_secret`: the key for a real server's skip."""

# When build_table fills the table by deferred acceptance instead of the kernel's loop (measured on a
# 2-vCPU VM with bench/maglev_bench.py; below these the loop finishes before numpy pays its setup).

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
_SIPHASH_INIT = (0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573)


# --------------------------------------------------------------------------------------------------
# hsiphash


def _rotl(x: int, bits: int) -> int:
    return ((x << bits) | (x >> (64 - bits))) & _MASK64


def _sipround(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 = (v0 + v1) & _MASK64
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & _MASK64
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & _MASK64
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & _MASK64
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash(data: bytes, key: tuple[int, int], c_rounds: int, d_rounds: int) -> int:
    """SipHash-c-d over `data` as `lib/siphash.c` computes it, full 64-bit result.

    The kernel's test vectors cover SipHash-2-4 and, on 64-bit kernels, `hsiphash` = SipHash-1-3
    truncated to 32 bits; one parameterised routine lets both sets check the same round code.
    """
    k0, k1 = key
    v0, v1, v2, v3 = (
        _SIPHASH_INIT[0] ^ k0,
        _SIPHASH_INIT[1] ^ k1,
        _SIPHASH_INIT[2] ^ k0,
        _SIPHASH_INIT[3] ^ k1,
    )
    whole = len(data) - len(data) % 8
    for i in range(0, whole, 8):
        m = int.from_bytes(data[i : i + 8], "little")
        v3 ^= m
        for _ in range(c_rounds):
            v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        v0 ^= m
    b = ((len(data) & 0xFF) << 56) | int.from_bytes(data[whole:], "little")
    v3 ^= b
    for _ in range(c_rounds):
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0 ^= b
    v2 ^= 0xFF
    for _ in range(d_rounds):
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def hsiphash(data: bytes, key: tuple[int, int]) -> int:
    """The 64-bit kernel's `hsiphash`: SipHash-1-3, truncated to the low 32 bits."""
    return siphash(data, key, 1, 3) & _MASK32


def hsiphash_u32(value: int, key: tuple[int, int]) -> int:
    """`hsiphash(&v, 4, key)` for one host-order u32 on a little-endian 64-bit kernel.

    The same value as `hsiphash(value.to_bytes(4, "little"), key)`, unrolled because every lookup
    runs it (once, or once per fallback step).
    """
    k0, k1 = key
    b = (4 << 56) | value
    v0, v1, v2, v3 = (
        _SIPHASH_INIT[0] ^ k0,
        _SIPHASH_INIT[1] ^ k1,
        _SIPHASH_INIT[2] ^ k0,
        _SIPHASH_INIT[3] ^ k1 ^ b,
    )
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0 ^= b
    v2 ^= 0xFF
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    return (v0 ^ v1 ^ v2 ^ v3) & _MASK32


def _rotl_array(x: U64Array, bits: int) -> U64Array:
    return (x << np.uint64(bits)) | (x >> np.uint64(64 - bits))


def _sipround_array(v0: U64Array, v1: U64Array, v2: U64Array, v3: U64Array) -> None:
    """SIPROUND in place; numpy's uint64 array arithmetic wraps exactly like the kernel's u64."""
    v0 += v1
    v1[:] = _rotl_array(v1, 13)
    v1 ^= v0
    v0[:] = _rotl_array(v0, 32)
    v2 += v3
    v3[:] = _rotl_array(v3, 16)
    v3 ^= v2
    v0 += v3
    v3[:] = _rotl_array(v3, 21)
    v3 ^= v0
    v2 += v1
    v1[:] = _rotl_array(v1, 17)
    v1 ^= v2
    v2[:] = _rotl_array(v2, 32)


def hsiphash_u32_array(values: npt.ArrayLike, key: tuple[int, int]) -> U64Array:
    """`hsiphash_u32` over an array of u32 values (returned as uint64 holding 32-bit hashes)."""
    v = np.asarray(values, dtype=np.uint64) & np.uint64(_MASK32)
    k0, k1 = key
    b = v | np.uint64(4 << 56)
    v0 = np.full(v.shape, _SIPHASH_INIT[0] ^ k0, dtype=np.uint64)
    v1 = np.full(v.shape, _SIPHASH_INIT[1] ^ k1, dtype=np.uint64)
    v2 = np.full(v.shape, _SIPHASH_INIT[2] ^ k0, dtype=np.uint64)
    v3 = b ^ np.uint64(_SIPHASH_INIT[3] ^ k1)
    _sipround_array(v0, v1, v2, v3)
    v0 ^= b
    v2 ^= np.uint64(0xFF)
    for _ in range(3):
        _sipround_array(v0, v1, v2, v3)
    v0 ^= v1
    v0 ^= v2
    v0 ^= v3
    return v0 & np.uint64(_MASK32)


# --------------------------------------------------------------------------------------------------
# Inputs


def address_key(address: str) -> int:
    """The host-order u32 that `ip_vs_mh_hashkey` folds an address to.

    IPv4 is `ntohl(addr)`.  IPv6 is `ntohl` of the XOR of the four big-endian 32-bit words, which
    equals the XOR of the words read as host-order integers.
    """
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
    except OSError:
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, address)
    except OSError:
        raise ValueError(f"{address!r} is not an IP address") from None
    words = (int.from_bytes(packed[i : i + 4], "big") for i in range(0, 16, 4))
    return reduce(lambda a, b: a ^ b, words)


def hash_input(key: int, port: int, offset: int = 0) -> int:
    """`v = offset + ntohs(port) + ntohl(addr_fold)` as the kernel's unsigned int wraps it."""
    return (offset + port + key) & _MASK32


@dataclass(frozen=True)
class Dest:
    """One real server as the kernel holds it.

    `weight` decides whether the server may take a connection now; `last_weight` is what the table is
    built from.  Use `Dest.added` and `with_weight` to follow the kernel's rule for the latter.
    """

    address: str
    port: int
    weight: int
    last_weight: int
    overloaded: bool = False
    """IP_VS_DEST_F_OVERLOAD: the connection count passed the upper threshold.  Such a server keeps its
    slots but counts as unavailable, exactly like weight 0."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port {self.port} out of range")
        if self.weight < 0 or self.last_weight < 0:
            raise ValueError("IPVS weights are never negative")

    @classmethod
    def added(cls, address: str, port: int, weight: int) -> Dest:
        """A real server as `ipvsadm -a` leaves it: an add always sets `last_weight`, even to 0."""
        return cls(address, port, weight, weight)

    def with_weight(self, weight: int) -> Dest:
        """The server after `ipvsadm -e`: an edit sets `last_weight` only to a non-zero weight."""
        return replace(self, weight=weight, last_weight=weight or self.last_weight)

    @property
    def available(self) -> bool:
        """Not `is_unavailable()` in ip_vs_mh.c: a positive weight and no overload flag."""
        return self.weight > 0 and not self.overloaded

    @property
    def key(self) -> int:
        return address_key(self.address)


def table_bits(size: int) -> int:
    """IP_VS_MH_TAB_BITS = CONFIG_IP_VS_MH_TAB_INDEX / 2: how many bits the largest turn count may use."""
    if size not in TABLE_SIZES:
        raise ValueError(f"{size} is not an IPVS MH table size; choose one of {TABLE_SIZES}")
    return (TABLE_SIZES.index(size) + 8) // 2


def turns(last_weights: Sequence[int], size: int) -> list[int]:
    """Consecutive slots each real server claims per round: `ds->turns` from ip_vs_mh_permutate.

    Weights are divided by their gcd (over the positive ones) and shifted right until the largest fits
    in `table_bits(size)` bits; a positive weight that shifts down to 0 still gets one turn.
    """
    bits = table_bits(size)
    positive = [w for w in last_weights if w > 0]
    if not positive:
        return [0] * len(last_weights)
    g = reduce(math.gcd, positive)
    shift = max(0, (max(positive) // g).bit_length() - bits)
    return [((w // g) >> shift) or (1 if w else 0) for w in last_weights]


# --------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True, eq=False)
class MaglevTable:
    """The kernel's lookup table: `slots[i]` is an index into `dests`, or -1 for an empty slot.

    Equality is identity (the slots are an array); compare two tables with `fingerprint`.
    """

    slots: IntArray
    dests: tuple[Dest, ...]
    size: int
    offsets: IntArray = field(repr=False)
    """Each real server's first preferred slot (`ds->offset`), kept for `explain`-style output."""
    skips: IntArray = field(repr=False)
    """Each real server's stride through the table (`ds->skip`)."""
    turns: tuple[int, ...] = ()
    usable: npt.NDArray[np.bool_] = field(init=False, repr=False)
    """Per real server whether it may take a connection, plus a final False that slot -1 indexes."""
    reachable: bool = field(init=False, repr=False)
    """Whether any slot belongs to a server that may take a connection."""

    def __post_init__(self) -> None:
        usable = np.array([d.available for d in self.dests] + [False], dtype=bool)
        object.__setattr__(self, "usable", usable)
        object.__setattr__(self, "reachable", bool(usable[self.slots].any()))


@dataclass(frozen=True)
class Choice:
    """Which real server the kernel schedules a new connection to, and how it got there."""

    dest_index: int
    slot: int
    """The slot that decided: the first one for a direct hit, the last one probed after fallback."""
    fallback_hops: int
    """0 for a direct hit; otherwise how many re-hashes `ip_vs_mh_get_fallback` needed."""


@dataclass(frozen=True)
class Share:
    """How much of the table a real server owns against how much its weight asks for."""

    dest: Dest
    slots: int
    slot_share: float
    weight_share: float

    @property
    def distortion(self) -> float | None:
        """slot_share / weight_share - 1: what table size and weight shifting did to the weight."""
        return self.slot_share / self.weight_share - 1 if self.weight_share else None


def dest_hashes(dests: Sequence[Dest], size: int) -> tuple[IntArray, IntArray]:
    """`ds->offset` and `ds->skip` for every real server, hashed from address and port alone."""
    v = np.array([hash_input(d.key, d.port) for d in dests], dtype=np.uint64)
    offsets = (hsiphash_u32_array(v, HASH1_KEY) % np.uint64(size)).astype(np.int64)
    skips = (hsiphash_u32_array(v, HASH2_KEY) % np.uint64(size - 1) + np.uint64(1)).astype(np.int64)
    return offsets, skips


def build_table(dests: Sequence[Dest], size: int = DEFAULT_TABLE_SIZE) -> MaglevTable:
    """The table `ip_vs_mh_reassign` leaves behind for these real servers, given head first."""
    dests = tuple(dests)
    claims = turns([d.last_weight for d in dests], size)
    if len(dests) > size:
        # ip_vs_mh_reassign returns -EINVAL and the kernel silently keeps its previous table.
        raise ValueError(f"{len(dests)} real servers do not fit a {size}-slot table; the kernel keeps a stale one")
    offsets, skips = dest_hashes(dests, size)
    slots = _populate(offsets, skips, np.array(claims, dtype=np.int64), size)
    slots.flags.writeable = False
    return MaglevTable(slots, dests, size, offsets, skips, tuple(claims))


def lookup(
    table: MaglevTable, client_addr: str, client_port: int = 0, *, mh_port: bool, mh_fallback: bool
) -> Choice | None:
    """The real server a new connection from this client gets, or None where the kernel drops it.

    The kernel hashes the client's (source) address, plus its source port under `mh-port` (only for
    TCP, UDP and SCTP: other protocols hash port 0).  Without `mh-fallback` a slot whose server is
    unavailable means "no destination available"; with it the address is re-hashed with a growing
    offset until an available server turns up.
    """
    key = address_key(client_addr)
    port = client_port if mh_port else 0
    size = table.size
    slots = table.slots
    first = hsiphash_u32(hash_input(key, port), HASH1_KEY) % size
    owner = int(slots[first])
    if owner < 0:
        return None
    if table.dests[owner].available:
        return Choice(owner, first, 0)
    if not mh_fallback or not table.reachable:
        # Without an available server in the table the kernel walks all `size` offsets in vain.
        return None
    for hop in range(size):
        slot = hsiphash_u32(hash_input(key, port, (hop + first) % size), HASH1_KEY) % size
        owner = int(slots[slot])
        if table.dests[owner].available:
            return Choice(owner, slot, hop + 1)
    return None


def lookup_many(
    table: MaglevTable,
    client_addrs: npt.ArrayLike,
    client_ports: npt.ArrayLike,
    *,
    mh_port: bool,
    mh_fallback: bool,
) -> IntArray:
    """`lookup` for many flows at once: the real server index per flow, -1 where the kernel drops it.

    `client_addrs` are `address_key` values (host-order u32; IPv6 already folded).
    """
    keys = np.asarray(client_addrs, dtype=np.uint64)
    ports = np.asarray(client_ports, dtype=np.uint64) if mh_port else np.zeros_like(keys)
    size = np.uint64(table.size)
    base = keys + ports
    first = (hsiphash_u32_array(base, HASH1_KEY) % size).astype(np.int64)
    owner = table.slots[first]
    available = table.usable
    result = np.where(available[owner], owner, -1)
    if not mh_fallback or not table.reachable:
        return result
    pending = np.flatnonzero((owner >= 0) & ~available[owner])
    start = first[pending].astype(np.uint64)
    for hop in range(table.size):
        if pending.size == 0:
            break
        offset = (start + np.uint64(hop)) % size
        slot = (hsiphash_u32_array(base[pending] + offset, HASH1_KEY) % size).astype(np.int64)
        found = table.slots[slot]
        hit = available[found]
        result[pending[hit]] = found[hit]
        pending = pending[~hit]
        start = start[~hit]
    return result


def fingerprint(table: MaglevTable) -> str:
    """A short digest of which (address, port) owns each slot; equal tables give equal digests.

    Owners are renumbered by (address, port) first and servers without slots leave no trace, so two
    directors compare by what the table says, not by how they count or what else they hold.
    """
    owning = np.unique(table.slots[table.slots >= 0]).tolist()
    names = {i: f"{bracketed(table.dests[i].address)}:{table.dests[i].port}" for i in owning}
    ordered = sorted(owning, key=names.__getitem__)
    canonical = np.full(len(table.dests) + 1, -1, dtype=np.int32)
    canonical[ordered] = np.arange(len(ordered), dtype=np.int32)
    digest = hashlib.blake2b(digest_size=8)
    digest.update("\n".join(names[i] for i in ordered).encode())
    digest.update(canonical[table.slots].astype("<i4").tobytes())
    return digest.hexdigest()


def shares(table: MaglevTable) -> list[Share]:
    """Per real server, its fraction of the slots next to its fraction of the summed `last_weight`."""
    counts = np.bincount(table.slots[table.slots >= 0], minlength=len(table.dests))
    total_weight = sum(d.last_weight for d in table.dests)
    return [
        Share(
            dest=d,
            slots=int(counts[i]),
            slot_share=int(counts[i]) / table.size,
            weight_share=d.last_weight / total_weight if total_weight else 0.0,
        )
        for i, d in enumerate(table.dests)
    ]


# --------------------------------------------------------------------------------------------------
# Population
#
# ip_vs_mh_populate hands out the table one claim at a time: each round, every real server in list
# order claims `turns` slots, each claim taking the first free slot along that server's permutation
# (offset, offset + skip, ... mod size), until every slot is taken.


COMPILED_FROM_SIZE = 16381
"""From this table size on, the fill runs compiled (numba, the optional `fast` extra) when it is installed:
about 20x the Python loop. Smaller tables, such as Debian's 4093, never import numba, whose import and first
compilation cost far more than they save."""


def _populate(offsets: IntArray, skips: IntArray, turns: IntArray, size: int) -> IntArray:
    """Slot -> index of the owning real server, as ip_vs_mh_populate leaves the table."""
    if size >= COMPILED_FROM_SIZE and _compiled_fill() is not None:
        return _populate_compiled(offsets.astype(np.int64), skips.astype(np.int64), turns.astype(np.int64), size)
    return _populate_sequentially(offsets.tolist(), skips.tolist(), turns.tolist(), size)


def _fill(offsets: IntArray, skips: IntArray, turns: IntArray, size: int) -> IntArray:
    """The kernel's loop over numpy arrays, written for numba: claim by claim, each taking the next free slot
    along its server's permutation. The same loop as `_populate_sequentially`, kept twice on purpose: numba
    needs arrays, and on arrays the interpreter runs it 2x slower than on lists (5.2 vs 2.7 ms at 4093)."""
    owner = np.full(size, -1, dtype=np.int64)
    if turns.sum() == 0:
        return owner
    taken = np.zeros(size, dtype=np.uint8)
    position = offsets.copy()
    filled = 0
    while True:
        for i in range(offsets.shape[0]):
            c = position[i]
            skip = skips[i]
            for _ in range(turns[i]):
                while taken[c]:
                    c += skip
                    if c >= size:
                        c -= size
                taken[c] = 1
                owner[c] = i
                filled += 1
                if filled == size:
                    return owner
            position[i] = c


@lru_cache(maxsize=1)
def _compiled_fill() -> Callable[[IntArray, IntArray, IntArray, int], IntArray] | None:
    """The compiled fill, or None without the optional `fast` extra: numba brings LLVM (over 100 MB) into
    an infrastructure agent whose default table (4093 slots) never uses it, so it is not a hard dependency.
    Without it big tables fill with the same loop in Python (about 20x slower, still exact)."""
    try:
        from numba import njit
    except ImportError:
        return None
    compiled: Callable[[IntArray, IntArray, IntArray, int], IntArray] = njit(cache=True, nogil=True)(_fill)
    return compiled


def _populate_compiled(offsets: IntArray, skips: IntArray, turns: IntArray, size: int) -> IntArray:
    fill = _compiled_fill()
    if fill is None:
        raise ImportError("the compiled Maglev fill needs numba: pip install 'maglev-bridge[fast]'")
    return fill(offsets, skips, turns, size)


def _populate_sequentially(offsets: list[int], skips: list[int], turns: list[int], size: int) -> IntArray:
    """The kernel's loop, claim by claim."""
    if not any(turns):
        return np.full(size, -1, dtype=np.int64)
    owner = [-1] * size
    taken = bytearray(size)
    position = list(offsets)
    filled = 0
    while True:
        for i, claims in enumerate(turns):
            if not claims:
                continue
            c = position[i]
            skip = skips[i]
            for _ in range(claims):
                while taken[c]:
                    c += skip
                    if c >= size:
                        c -= size
                taken[c] = 1
                owner[c] = i
                filled += 1
                if filled == size:
                    return np.array(owner, dtype=np.int64)
            position[i] = c
