"""The filter's transactions as nf_tables netlink messages, sent in one NFNL batch (one kernel transaction).

Why not libnftables for writing (bench/filter_bench.py, 2,000 VIPs x 20 prefixes, host kernel): before any
`add element` or `delete element` libnftables 1.0.6 fills its cache with the elements of every interval set of
the table (NFT_CACHE_SETELEM_MAYBE: one GETSETELEM dump per set, 2,006-2,007 `sendto` for one element, seen
with strace), so changing one list cost 135-155 ms however small the change, and its JSON input costs about
twice its text input (one transaction of the whole filter: 792 ms in libnftables vs `nft -f` 483 ms). The
kernel needs none of that cache: the plan already knows the table. pyroute2 0.9.7's NFTSocket wraps each
command in a transaction of its own; its begin()/commit() sends a batch without reading the kernel's answers,
every message under one sequence number, so a refused transaction would be neither noticed nor attributed; and
its message classes encode the 80,000 elements of that table in 4.5-5.6 s (nft_set_elem_list_msg) where
packing each element whole takes 27-36 ms. So this module writes the few message kinds the filter uses,
exactly as `nft --debug=netlink` shows libnftables writing them (same expressions, comments in the same
userdata TLV, so `nft list` prints the table as before). Reading stays with libnftables
(bridge/dataplane/nft.py).

The batch is sent in one `sendmsg`: nfnetlink runs it, commits or aborts it and queues every answer before
the call returns (libnftables relies on the same), so the answers are read without blocking. An error for
any message aborts the whole transaction: nothing changes. A new rule is sent with NLM_F_ECHO so the kernel
returns it with its handle, which a later pass needs to delete it.
"""

from __future__ import annotations

import socket
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from bridge.core.keys import ServiceKey
from bridge.core.ops import AddAllow, ChangeAllow, CreateFilter, FilterOp
from bridge.dataplane.netlink_batch import NLM_F_CREATE, NLM_F_REQUEST, NLMSG_ERROR, attr, describe, parse_attrs

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFPROTO_INET = 1
NETLINK_NETFILTER = 12
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
RECEIVE_BUFFER = 1 << 20
NLM_F_ECHO = 0x8
NLM_F_APPEND = 0x800
NLA_F_NESTED = 0x8000
_NESTED_1 = 1 | NLA_F_NESTED

NEWTABLE, NEWCHAIN, NEWRULE, DELRULE, NEWSET, DELSET, NEWSETELEM, DELSETELEM, NEWOBJ, DELOBJ = (
    0, 3, 6, 8, 9, 11, 12, 14, 18, 20)
NFT_OBJECT_COUNTER = 1
NF_INET_LOCAL_IN = 1
NF_DROP, NF_ACCEPT = 0, 1
NFT_REG_VERDICT, NFT_REG_1 = 0, 1
NFT_SET_INTERVAL = 0x4
NFT_SET_ELEM_INTERVAL_END = 0x1
TYPE_IPADDR, TYPE_IP6ADDR = 7, 8
BYTEORDER_BIG_ENDIAN = 2
ELEMENTS_PER_MESSAGE = 1000
"""A nested attribute's length is 16 bits: 1,000 elements of 24 bytes stay well under it."""
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


def _string(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def _be32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("!I", value))


def _nest(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def _comment(text: str) -> bytes:
    """libnftnl's userdata TLV: type 0 (the comment of a rule, set or object), length, NUL-terminated text."""
    data = text.encode() + b"\0"
    return struct.pack("=BB", 0, len(data)) + data


def _expr(name: str, *parts: bytes) -> bytes:
    return _nest(1, _string(1, name), _nest(2, *parts))  # NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA }


def _meta(key: int) -> bytes:
    return _expr("meta", _be32(2, key), _be32(1, NFT_REG_1))  # NFTA_META_KEY, NFTA_META_DREG


def _payload(base: int, offset: int, length: int) -> bytes:
    # NFTA_PAYLOAD_DREG, _BASE (1 network, 2 transport header), _OFFSET, _LEN
    return _expr("payload", _be32(1, NFT_REG_1), _be32(2, base), _be32(3, offset), _be32(4, length))


def _equal(value: bytes) -> bytes:
    return _expr("cmp", _be32(1, NFT_REG_1), _be32(2, 0), _nest(3, attr(1, value)))  # SREG, OP eq, DATA{VALUE}


@dataclass(frozen=True)
class _Family:
    """What differs between an IPv4 and an IPv6 rule and set: the nfproto match, where the addresses sit in
    the network header, the address length and the set's key type."""

    nfproto: bytes
    daddr: bytes
    saddr: bytes
    size: int
    key_type: int


FAMILIES = {
    4: _Family(_meta(15) + _equal(b"\x02"), _payload(1, 16, 4), _payload(1, 12, 4), 4, TYPE_IPADDR),  # NFPROTO_IPV4
    6: _Family(_meta(15) + _equal(b"\x0a"), _payload(1, 24, 16), _payload(1, 8, 16), 16, TYPE_IP6ADDR),  # ..._IPV6
}
_DPORT = _payload(2, 2, 2)
_L4PROTO = {name: _meta(16) + _equal(bytes([number])) for name, number in PROTOCOLS.items()}  # NFT_META_L4PROTO
_DROP = _expr("immediate", _be32(1, NFT_REG_VERDICT), _nest(2, _nest(2, _be32(1, NF_DROP))))  # DATA{VERDICT{CODE}}


def rule_expressions(key: ServiceKey, ident: str) -> bytes:
    """`meta nfproto ipv4 ip daddr VIP meta l4proto P P dport PORT ip saddr != @allow_ID counter name
    drop_ID drop` (for an IPv6 VIP `meta nfproto ipv6 ip6 daddr ... ip6 saddr`), the expressions libnftables
    generates for that rule in an inet table (the fixed ones encoded once)."""
    family = FAMILIES[key.family]
    vip = socket.inet_pton(socket.AF_INET6 if key.family == 6 else socket.AF_INET, key.vip)
    return b"".join((
        family.nfproto, family.daddr, _equal(vip),
        _L4PROTO[key.protocol], _DPORT, _equal(struct.pack("!H", key.port)),
        family.saddr,
        _expr("lookup", _string(1, f"allow_{ident}"), _be32(2, NFT_REG_1), _be32(5, 1)),  # SET, SREG, F_INV
        _expr("objref", _be32(1, NFT_OBJECT_COUNTER), _string(2, f"drop_{ident}")),  # IMM_TYPE, IMM_NAME
        _DROP,
    ))


_INTERVAL_END = struct.pack("!I", NFT_SET_ELEM_INTERVAL_END)
_OPEN = attr(6, struct.pack("=BBI", 1, 4, 1))
"""NFTA_SET_ELEM_USERDATA { NFTNL_UDATA_SET_ELEM_FLAGS: NFTNL_SET_ELEM_F_INTERVAL_OPEN }: an interval that
runs to the last address, which has no end element."""


def _start(first: bytes) -> bytes:
    size = len(first)
    return struct.pack(f"=HHHHHH{size}s", 12 + size, _NESTED_1, 8 + size, _NESTED_1, 4 + size, 1, first)


def _end(address: int, size: int) -> bytes:
    return struct.pack(f"=HHHHHH{size}sHH4s", 20 + size, _NESTED_1, 8 + size, _NESTED_1, 4 + size, 1,
                       address.to_bytes(size, "big"), 8, 3, _INTERVAL_END)


def interval_elements(prefixes: Iterable[str]) -> list[bytes]:
    """The prefixes (all of one family) as libnftables writes them into an interval set (`nft
    --debug=netlink`): an end element at 0.0.0.0 (or ::) unless a prefix starts there; then, in address
    order, each prefix's first address and the address after its last one flagged as an interval end (a
    prefix reaching the last address has no end and is marked open). Each element is packed whole
    (NFTA_LIST_ELEM { NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE address } }): a large table has tens of thousands,
    and attribute by attribute they cost more than the kernel's whole transaction."""
    ranges = []
    size = 4
    for prefix in prefixes:
        address, _, length = prefix.partition("/")
        family, size = (socket.AF_INET6, 16) if ":" in address else (socket.AF_INET, 4)
        first = socket.inet_pton(family, address)
        ranges.append((first, int.from_bytes(first, "big") + (1 << (size * 8 - int(length or size * 8)))))
    ranges.sort()
    found = [] if ranges and ranges[0][0] == bytes(size) else [_end(0, size)]
    for first, end in ranges:
        start = _start(first)
        if end < 1 << size * 8:
            found += (start, _end(end, size))
        else:
            found.append(struct.pack("=HH", len(start) + len(_OPEN), _NESTED_1) + start[4:] + _OPEN)
    return found


@dataclass(frozen=True, slots=True)
class Message:
    """One request of the batch: nf_tables message type, extra flags, attributes."""

    kind: int
    flags: int
    body: bytes


def messages(op: FilterOp, table: str, chain: str, comment: str, ident: str, label: str) -> Iterator[Message]:
    """One filter operation as nf_tables requests (the same objects bridge/dataplane/nft.py describes)."""
    owner = _string(1, table)
    if isinstance(op, CreateFilter):
        yield Message(NEWTABLE, NLM_F_CREATE, _string(1, table))
        hook = _nest(4, _be32(1, NF_INET_LOCAL_IN), _be32(2, 0))  # NFTA_HOOK_HOOKNUM, _PRIORITY
        yield Message(NEWCHAIN, NLM_F_CREATE, owner + _string(3, chain) + hook + _be32(5, NF_ACCEPT)
                      + _string(7, "filter"))
        return
    allow = owner + _string(2, f"allow_{ident}")
    if isinstance(op, AddAllow):
        counter = owner + _string(2, f"drop_{ident}") + _be32(3, NFT_OBJECT_COUNTER)
        yield Message(NEWOBJ, NLM_F_CREATE, counter + _nest(4) + attr(8, _comment(f"{comment} {label}")))
        # FLAGS, KEY_TYPE, KEY_LEN, ID (required; this batch names sets, so any number), USERDATA
        byteorder = struct.pack("=BBI", 0, 4, BYTEORDER_BIG_ENDIAN)  # NFTNL_UDATA_SET_KEYBYTEORDER
        family = FAMILIES[op.key.family]
        yield Message(NEWSET, NLM_F_CREATE, allow + _be32(3, NFT_SET_INTERVAL) + _be32(4, family.key_type)
                      + _be32(5, family.size) + _be32(10, zlib.crc32(ident.encode())) + attr(13, byteorder))
    if isinstance(op, ChangeAllow):
        yield Message(DELSETELEM, 0, allow)  # no element list: the kernel flushes the set
    if isinstance(op, AddAllow | ChangeAllow):
        elements = interval_elements(op.prefixes)
        for start in range(0, len(elements), ELEMENTS_PER_MESSAGE):
            yield Message(NEWSETELEM, NLM_F_CREATE, allow + _nest(3, *elements[start:start + ELEMENTS_PER_MESSAGE]))
    if isinstance(op, AddAllow):
        yield Message(NEWRULE, NLM_F_CREATE | NLM_F_APPEND | NLM_F_ECHO,
                      owner + _string(2, chain) + _nest(4, rule_expressions(op.key, ident))
                      + attr(7, _comment(f"{comment} {label}")))
        return
    if isinstance(op, ChangeAllow):
        return
    if op.rule is not None:
        yield Message(DELRULE, 0, owner + _string(2, chain) + attr(3, struct.pack("!Q", op.rule)))
    if op.set:
        yield Message(DELSET, 0, allow)
    if op.counter:
        yield Message(DELOBJ, 0, owner + _string(2, f"drop_{ident}") + _be32(3, NFT_OBJECT_COUNTER))


def _header(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body


def batch(requests: Iterable[Message]) -> bytes:
    """BATCH_BEGIN, the requests (family inet, sequence numbers from 1), BATCH_END as one buffer."""
    inet = struct.pack("=BBH", NFPROTO_INET, 0, 0)
    parts = [_header(NFNL_MSG_BATCH_BEGIN, 0, 0, struct.pack("=BBH", socket.AF_UNSPEC, 0,
                                                              socket.htons(NFNL_SUBSYS_NFTABLES)))]
    for seq, request in enumerate(requests, start=1):
        parts.append(_header(NFNL_SUBSYS_NFTABLES << 8 | request.kind, request.flags, seq, inet + request.body))
    parts.append(_header(NFNL_MSG_BATCH_END, 0, len(parts), struct.pack("=BBH", socket.AF_UNSPEC, 0,
                                                                          socket.htons(NFNL_SUBSYS_NFTABLES))))
    return b"".join(parts)


class TransactionError(RuntimeError):
    """The kernel refused the transaction (nothing changed): `index` of the first refused request (from 0;
    None when the kernel refused the commit as a whole) and the kernel's reason."""

    def __init__(self, index: int | None, reason: str) -> None:
        super().__init__(reason)
        self.index = index


def _rule_comment(message: bytes) -> str:
    """The comment of an echoed NEWRULE (its NFTA_RULE_USERDATA TLV), '' when it has none."""
    data = parse_attrs(message, 20, len(message)).get(7, b"")
    if len(data) < 2 or data[0] != 0:
        return ""
    return data[2:2 + data[1]].rstrip(b"\0").decode(errors="replace")


class NftSocket:
    """A NETLINK_NETFILTER socket in the calling thread's network namespace, for whole transactions."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))

    def close(self) -> None:
        self.sock.close()

    def transaction(self, requests: Iterable[Message]) -> dict[str, int]:
        """Send every request as one transaction. Returns the handle of each new rule by its comment; raises
        TransactionError when the kernel refused it (then nothing changed)."""
        requests = list(requests)
        buffer = batch(requests)
        # One datagram: nfnetlink takes a batch only whole, and a datagram is capped at the send buffer. Every
        # echoed rule waits in the receive buffer until the batch is done (about 2 KiB of it each). Both
        # are forced past the sysctl limits, as nft does (root).
        echoed = sum(1 for request in requests if request.flags & NLM_F_ECHO)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(buffer) + 4096)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, max(RECEIVE_BUFFER, 4096 * echoed))
        self.sock.sendall(buffer)
        errors: list[tuple[int, int]] = []
        handles: dict[str, int] = {}
        for kind, seq, message in self._pending():
            if kind == NLMSG_ERROR:
                code = -struct.unpack_from("=i", message, 16)[0]
                if code:
                    errors.append((seq, code))
            elif kind == NFNL_SUBSYS_NFTABLES << 8 | NEWRULE:
                handle = parse_attrs(message, 20, len(message)).get(3)
                if handle is not None:
                    handles[_rule_comment(message)] = struct.unpack("!Q", handle)[0]
        if errors:
            seq, code = min(errors)
            raise TransactionError(seq - 1 if 1 <= seq <= len(requests) else None, describe(code))
        return handles

    def _pending(self) -> Iterator[tuple[int, int, bytes]]:
        """Every answer already queued: nfnetlink answered the whole batch inside sendmsg."""
        while True:
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
                yield kind, seq, data[offset:offset + length]
                offset += (length + 3) & ~3
