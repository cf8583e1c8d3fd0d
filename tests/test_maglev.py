"""bridge.core.maglev against the kernel's own hash vectors and a literal port of ip_vs_mh.c."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest

from bridge.core.maglev import (
    DEFAULT_TABLE_SIZE,
    Dest,
    MaglevTable,
    _populate_compiled,
    address_key,
    build_table,
    dest_hashes,
    fingerprint,
    hsiphash,
    hsiphash_u32,
    hsiphash_u32_array,
    lookup,
    lookup_many,
    shares,
    siphash,
    turns,
)
from bridge.core.model import TABLE_SIZES
from tests import maglev_reference as ref

# lib/test_siphash.c: key bytes 00..0f, input bytes 00..(n-1) for n = 0..63.
TEST_KEY = (0x0706050403020100, 0x0F0E0D0C0B0A0908)

SIPHASH_2_4 = [
    0x726FDB47DD0E0E31, 0x74F839C593DC67FD, 0x0D6C8009D9A94F5A, 0x85676696D7FB7E2D,
    0xCF2794E0277187B7, 0x18765564CD99A68D, 0xCBC9466E58FEE3CE, 0xAB0200F58B01D137,
    0x93F5F5799A932462, 0x9E0082DF0BA9E4B0, 0x7A5DBBC594DDB9F3, 0xF4B32F46226BADA7,
    0x751E8FBC860EE5FB, 0x14EA5627C0843D90, 0xF723CA908E7AF2EE, 0xA129CA6149BE45E5,
    0x3F2ACC7F57C29BDB, 0x699AE9F52CBE4794, 0x4BC1B3F0968DD39C, 0xBB6DC91DA77961BD,
    0xBED65CF21AA2EE98, 0xD0F2CBB02E3B67C7, 0x93536795E3A33E88, 0xA80C038CCD5CCEC8,
    0xB8AD50C6F649AF94, 0xBCE192DE8A85B8EA, 0x17D835B85BBB15F3, 0x2F2E6163076BCFAD,
    0xDE4DAAACA71DC9A5, 0xA6A2506687956571, 0xAD87A3535C49EF28, 0x32D892FAD841C342,
    0x7127512F72F27CCE, 0xA7F32346F95978E3, 0x12E0B01ABB051238, 0x15E034D40FA197AE,
    0x314DFFBE0815A3B4, 0x027990F029623981, 0xCADCD4E59EF40C4D, 0x9ABFD8766A33735C,
    0x0E3EA96B5304A7D0, 0xAD0C42D6FC585992, 0x187306C89BC215A9, 0xD4A60ABCF3792B95,
    0xF935451DE4F21DF2, 0xA9538F0419755787, 0xDB9ACDDFF56CA510, 0xD06C98CD5C0975EB,
    0xE612A3CB9ECBA951, 0xC766E62CFCADAF96, 0xEE64435A9752FE72, 0xA192D576B245165A,
    0x0A8787BF8ECB74B2, 0x81B3E73D20B49B6F, 0x7FA8220BA3B2ECEA, 0x245731C13CA42499,
    0xB78DBFAF3A8D83BD, 0xEA1AD565322A1A0B, 0x60E61C23A3795013, 0x6606D7E446282B93,
    0x6CA4ECB15C5F91E1, 0x9F626DA15C9625F3, 0xE51B38608EF25F57, 0x958A324CEB064572,
]  # fmt: skip

# The BITS_PER_LONG == 64 table: hsiphash is SipHash-1-3 there, truncated to u32.
HSIPHASH_64BIT = [
    0x050FC4DC, 0x7D57CA93, 0x4DC7D44D, 0xE7DDF7FB, 0x88D38328, 0x49533B67, 0xC59F22A7, 0x9BB11140,
    0x8D299A8E, 0x6C063DE4, 0x92FF097F, 0xF94DC352, 0x57B4D9A2, 0x1229FFA7, 0xC0F95D34, 0x2A519956,
    0x7D908B66, 0x63DBD80C, 0xB473E63E, 0x8D297D1C, 0xA6CCE040, 0x2B45F844, 0xA320872E, 0xDAE6C123,
    0x67349C8C, 0x705B0979, 0xCA9913A5, 0x4ADE3B35, 0xEF6CD00D, 0x4AB1E1F4, 0x43C5E663, 0x8C21D1BC,
    0x16A7B60D, 0x7A8FF9BF, 0x1F2A753E, 0xBF186B91, 0xADA26206, 0xA3C33057, 0xAE3A36A1, 0x7B108392,
    0x99E41531, 0x3F1AD944, 0xC8138825, 0xC28949A6, 0xFAF8876B, 0x9F042196, 0x68B1D623, 0x8B5114FD,
    0xDF074C46, 0x12CC86B3, 0x0A52098F, 0x9D292F9A, 0xA2F41F12, 0x43A71ED0, 0x73F0BCE6, 0x70A7E980,
    0x243C6D75, 0xFDB71513, 0xA67D8A08, 0xB7E8F148, 0xF7A644EE, 0x0F1837F2, 0x4B6694E0, 0xB7BBB3A8,
]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# hsiphash


@pytest.mark.parametrize("n", range(64))
def test_hsiphash_matches_kernel_test_vectors(n: int) -> None:
    assert hsiphash(bytes(range(n)), TEST_KEY) == HSIPHASH_64BIT[n]


@pytest.mark.parametrize("n", range(64))
def test_siphash_2_4_matches_kernel_test_vectors(n: int) -> None:
    assert siphash(bytes(range(n)), TEST_KEY, 2, 4) == SIPHASH_2_4[n]


def test_hsiphash_u32_is_hsiphash_of_four_little_endian_bytes() -> None:
    # hsiphash_1u32(0x03020100) == test_vectors_hsiphash[4] in lib/test_siphash.c
    assert hsiphash_u32(0x03020100, TEST_KEY) == HSIPHASH_64BIT[4]
    rng = random.Random(1)
    values = [rng.getrandbits(32) for _ in range(500)] + [0, 0xFFFFFFFF]
    expected = [hsiphash(v.to_bytes(4, "little"), TEST_KEY) for v in values]
    assert [hsiphash_u32(v, TEST_KEY) for v in values] == expected
    assert hsiphash_u32_array(np.array(values, dtype=np.uint64), TEST_KEY).tolist() == expected


# --------------------------------------------------------------------------------------------------
# Inputs


def test_table_sizes_and_default() -> None:
    assert TABLE_SIZES == (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
    assert TABLE_SIZES[12 - 8] == DEFAULT_TABLE_SIZE


def test_ipv6_addresses_fold_by_xor_of_words() -> None:
    assert address_key("10.1.2.3") == 0x0A010203
    words = (0x20010DB8, 0x00000000, 0x00000000, 0x00000001)
    assert address_key("2001:db8::1") == words[0] ^ words[1] ^ words[2] ^ words[3]
    with pytest.raises(ValueError):
        address_key("not-an-address")


@pytest.mark.parametrize(
    ("weights", "size", "expected"),
    [
        ([1, 1, 1], 4093, [1, 1, 1]),
        ([2, 4, 6], 4093, [1, 2, 3]),
        ([0, 5, 10], 4093, [0, 1, 2]),
        # max/gcd = 1000 needs 10 bits, 6 allowed at index 12: shift 4; 1 >> 4 = 0 still gets a turn.
        ([1, 1000], 4093, [1, 62]),
        ([1, 1000], 251, [1, 62 >> 2]),
        ([0, 0], 4093, [0, 0]),
        ([], 4093, []),
        ([63, 64], 4093, [31, 32]),
    ],
)
def test_turns_follow_gcd_and_shift(weights: list[int], size: int, expected: list[int]) -> None:
    assert turns(weights, size) == expected


def test_dest_weight_history_follows_ip_vs_update_dest() -> None:
    added_at_zero = Dest.added("10.0.0.1", 80, 0)
    assert added_at_zero.last_weight == 0
    drained = Dest.added("10.0.0.2", 80, 5).with_weight(0)
    assert (drained.weight, drained.last_weight) == (0, 5)
    assert drained.with_weight(3).last_weight == 3
    assert not drained.available
    assert not Dest("10.0.0.3", 80, 1, 1, overloaded=True).available
    with pytest.raises(ValueError):
        Dest("10.0.0.4", 80, -1, 0)


# --------------------------------------------------------------------------------------------------
# Tables against the kernel port


def random_dests(rng: random.Random, count: int, *, zero_share: float = 0.1) -> list[Dest]:
    dests: list[Dest] = []
    seen = set()
    while len(dests) < count:
        address = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        port = rng.choice([80, 443, 8080, rng.randrange(1, 65536)])
        if (address, port) in seen:
            continue
        seen.add((address, port))
        weight = rng.choice([1, 1, 1, 2, 3, 5, 10, 100, 256, 1000, 65535])
        dest = Dest.added(address, port, weight)
        roll = rng.random()
        if roll < zero_share:
            dest = Dest.added(address, port, 0)
        elif roll < 2 * zero_share:
            dest = dest.with_weight(0)
        dests.append(dest)
    return dests


def cases(seed: int, count: int) -> Iterator[tuple[list[Dest], int]]:
    rng = random.Random(seed)
    for _ in range(count):
        size = rng.choice(TABLE_SIZES[:7])
        yield random_dests(rng, rng.randint(0, min(size, 120))), size


@pytest.mark.parametrize(("dests", "size"), list(cases(seed=11, count=40)))
def test_table_equals_kernel_port(dests: list[Dest], size: int) -> None:
    assert build_table(dests, size).slots.tolist() == ref.populate(dests, size)


@pytest.mark.parametrize("size", TABLE_SIZES)
def test_every_table_size_works(size: int) -> None:
    dests = random_dests(random.Random(size), min(40, size // 4), zero_share=0.0)
    table = build_table(dests, size)
    assert table.slots.shape == (size,)
    assert (table.slots >= 0).all()
    if size <= 16381:
        assert table.slots.tolist() == ref.populate(dests, size)


@pytest.mark.parametrize(
    ("servers", "size", "weighted"),
    [(60, 4093, False), (200, 8191, True), (30, 2039, True), (3, 1021, False), (251, 251, False)],
)
def test_compiled_population_equals_kernel_port(servers: int, size: int, weighted: bool) -> None:
    # build_table only switches to the compiled fill for big tables; drive it directly on small ones too.
    rng = random.Random(servers * size)
    dests = random_dests(rng, servers, zero_share=0.1 if weighted else 0.0)
    if not weighted:
        dests = [Dest.added(d.address, d.port, 1) for d in dests]
    offsets, skips = dest_hashes(dests, size)
    claims = np.array(turns([d.last_weight for d in dests], size), dtype=np.int64)
    assert _populate_compiled(offsets, skips, claims, size).tolist() == ref.populate(dests, size)


def test_big_table_equals_kernel_port() -> None:
    # Many servers, small weights and a big table: the shape build_table settles in bulk.
    rng = random.Random(5)
    dests = [Dest.added(d.address, d.port, rng.choice([1, 1, 2, 3])) for d in random_dests(rng, 400)]
    dests[7] = Dest.added(dests[7].address, dests[7].port, 0)
    dests[9] = dests[9].with_weight(0)
    assert build_table(dests, 32749).slots.tolist() == ref.populate(dests, 32749)


def test_big_table_without_the_fast_extra_fills_in_python_with_the_same_result(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # numba is optional (the `fast` extra): without it build_table must still be exact, only slower.
    rng = random.Random(11)
    dests = [Dest.added(d.address, d.port, rng.choice([1, 2])) for d in random_dests(rng, 50)]
    compiled = build_table(dests, 16381).slots.tolist()
    monkeypatch.setattr("bridge.core.maglev._compiled_fill", lambda: None)
    assert build_table(dests, 16381).slots.tolist() == compiled == ref.populate(dests, 16381)


def test_more_dests_than_slots_is_refused() -> None:
    dests = [Dest.added(f"10.0.{i // 250}.{i % 250 + 1}", 80, 1) for i in range(252)]
    with pytest.raises(ValueError, match="stale"):
        build_table(dests, 251)


def test_no_positive_last_weight_leaves_the_table_empty() -> None:
    for dests in ([], [Dest.added("10.0.0.1", 80, 0)]):
        table = build_table(dests)
        assert (table.slots == -1).all()
        assert lookup(table, "192.0.2.1", 1234, mh_port=False, mh_fallback=True) is None


# --------------------------------------------------------------------------------------------------
# Properties


def servers(count: int, weight: int = 1) -> list[Dest]:
    return [Dest.added(f"10.0.{i // 200}.{i % 200 + 1}", 8080, weight) for i in range(count)]


def test_each_weighted_dest_gets_slots_and_shares_follow_weights() -> None:
    dests = [*servers(8), Dest.added("10.1.0.1", 8080, 3)]
    table = build_table(dests)
    result = shares(table)
    assert all(s.slots > 0 for s in result)
    assert sum(s.slots for s in result) == table.size
    for s in result:
        assert s.distortion is not None
        assert abs(s.distortion) < 0.05
    assert sum(s.slot_share for s in result) == pytest.approx(1.0)


def test_dest_added_with_weight_zero_gets_no_slots() -> None:
    dests = [*servers(4), Dest.added("10.9.9.9", 8080, 0)]
    table = build_table(dests)
    assert shares(table)[-1].slots == 0
    assert shares(table)[-1].distortion is None


def test_dest_edited_to_zero_keeps_slots_and_fallback_moves_its_flows() -> None:
    dests = servers(4)
    before = build_table(dests)
    drained = [*dests[:2], dests[2].with_weight(0), dests[3]]
    after = build_table(drained)
    assert np.array_equal(before.slots, after.slots)

    rng = random.Random(3)
    clients = [f"192.0.{rng.randrange(256)}.{rng.randrange(1, 255)}" for _ in range(400)]
    hit_drained = 0
    for client in clients:
        plain = lookup(after, client, mh_port=False, mh_fallback=False)
        fallback = lookup(after, client, mh_port=False, mh_fallback=True)
        original = lookup(before, client, mh_port=False, mh_fallback=False)
        assert original is not None
        assert fallback is not None
        if original.dest_index == 2:
            hit_drained += 1
            assert plain is None
            assert fallback.dest_index != 2
            assert fallback.fallback_hops >= 1
        else:
            assert plain == fallback == original
    assert hit_drained > 50


def test_overloaded_dest_counts_as_unavailable() -> None:
    dests = servers(3)
    flagged = [dests[0], Dest(dests[1].address, dests[1].port, 1, 1, overloaded=True), dests[2]]
    table = build_table(flagged)
    for i in range(200):
        choice = lookup(table, f"198.51.100.{i}", mh_port=False, mh_fallback=True)
        assert choice is not None
        assert choice.dest_index != 1


def test_list_order_matters() -> None:
    dests = servers(10)
    forward = build_table(dests)
    backward = build_table(list(reversed(dests)))
    assert fingerprint(forward) != fingerprint(backward)
    owners_forward = [forward.dests[i].address for i in forward.slots]
    owners_backward = [backward.dests[i].address for i in backward.slots]
    assert owners_forward != owners_backward


def test_fingerprint_ignores_how_dests_are_numbered() -> None:
    table = build_table(servers(6))
    order = [3, 1, 5, 0, 2, 4]
    renumber = np.empty(6, dtype=np.int64)
    renumber[order] = np.arange(6)
    shuffled = MaglevTable(
        slots=renumber[table.slots],
        dests=tuple(table.dests[i] for i in order),
        size=table.size,
        offsets=table.offsets[order],
        skips=table.skips[order],
    )
    assert fingerprint(shuffled) == fingerprint(table)
    assert len(fingerprint(table)) == 16
    # A server that owns no slot (added at weight 0) does not change what the table says.
    assert fingerprint(build_table([*servers(6), Dest.added("10.9.9.9", 80, 0)])) == fingerprint(table)


@pytest.mark.parametrize("mh_port", [False, True])
@pytest.mark.parametrize("mh_fallback", [False, True])
def test_lookup_matches_kernel_schedule(mh_port: bool, mh_fallback: bool) -> None:
    rng = random.Random(int(mh_port) * 2 + int(mh_fallback))
    dests = random_dests(rng, 12, zero_share=0.2)
    dests.append(Dest("10.200.0.1", 80, 4, 4, overloaded=True))
    table = build_table(dests, 1021)
    lookup_table = table.slots.tolist()
    for _ in range(300):
        client = f"203.0.{rng.randrange(256)}.{rng.randrange(256)}"
        port = rng.randrange(1024, 65536)
        choice = lookup(table, client, port, mh_port=mh_port, mh_fallback=mh_fallback)
        expected = ref.schedule(dests, lookup_table, client, port, mh_port=mh_port, mh_fallback=mh_fallback)
        assert (choice.dest_index if choice else None) == expected


def test_lookup_without_mh_port_ignores_the_client_port() -> None:
    table = build_table(servers(20))
    choices = {lookup(table, "192.0.2.7", port, mh_port=False, mh_fallback=False) for port in range(50)}
    assert len(choices) == 1
    with_port = {lookup(table, "192.0.2.7", port, mh_port=True, mh_fallback=False) for port in range(50)}
    assert len(with_port) > 1


@pytest.mark.parametrize("mh_port", [False, True])
@pytest.mark.parametrize("mh_fallback", [False, True])
def test_lookup_many_equals_lookup(mh_port: bool, mh_fallback: bool) -> None:
    rng = random.Random(42)
    dests = random_dests(rng, 25, zero_share=0.25)
    table = build_table(dests, 2039)
    clients = [f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
               for _ in range(2000)]  # fmt: skip
    ports = [rng.randrange(65536) for _ in clients]
    many = lookup_many(
        table,
        np.array([address_key(c) for c in clients], dtype=np.uint64),
        np.array(ports),
        mh_port=mh_port,
        mh_fallback=mh_fallback,
    )
    single = [
        lookup(table, c, p, mh_port=mh_port, mh_fallback=mh_fallback) for c, p in zip(clients, ports, strict=True)
    ]
    assert many.tolist() == [s.dest_index if s else -1 for s in single]


def test_lookup_many_drops_everything_when_nothing_is_available() -> None:
    dests = [d.with_weight(0) for d in servers(5)]
    table = build_table(dests)
    keys = np.arange(100, dtype=np.uint64) * 7919
    for fallback in (False, True):
        assert (lookup_many(table, keys, keys, mh_port=True, mh_fallback=fallback) == -1).all()
