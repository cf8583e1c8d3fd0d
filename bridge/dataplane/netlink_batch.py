"""Netlink requests in batches: many messages per send, acknowledgements matched by sequence number.

pyroute2 sends one request and waits for its answer, decoding every message through its generic NLA
machinery; for the thousands of IPVS rules and VIP routes of a large director that costs many times what
the kernel does (measured 17x `ipvsadm -R`). Each request is independent in the kernel, so batching keeps
the semantics: a failed request is reported with its index and the rest still apply.

Only the last request of a batch asks for an acknowledgement (NLM_F_ACK). The kernel answers a failed request
with an error message whether or not it was asked (netlink_rcv_skb: `if (flags & NLM_F_ACK || err)`), in the
order it processed the requests, so the last request's acknowledgement comes after every error of its batch.
Acknowledging every request cost a receive and a message to decode per request: 10,500 in a full apply of 500
VIPs x 20 backends, whose receive calls alone took 0.12-0.19 s in the test VM (bench/apply_bench.py); now 54.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator, Sequence

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLM_F_EXCL = 0x200
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
MAX_BATCH_BYTES = 32 * 1024


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def u16(kind: int, value: int) -> bytes:
    return struct.pack("=HHH2x", 6, kind, value)  # attr(kind, struct.pack("=H", value)) in one pack


def u32(kind: int, value: int) -> bytes:
    return struct.pack("=HHI", 8, kind, value)


def be16(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("!H", value))


def parse_attrs(data: bytes, start: int, end: int) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, start)
        if length < 4:
            break
        attrs[kind & 0x3FFF] = data[start + 4 : start + length]
        start += (length + 3) & ~3
    return attrs


def describe(code: int) -> str:
    return f"{errno.errorcode.get(code, str(code))}: {os.strerror(code)}"


def _batch_end(requests: Sequence[tuple[int, int, bytes]], start: int) -> int:
    """Where the batch that begins at `start` ends: at least one request, and up to MAX_BATCH_BYTES."""
    end, size = start, 0
    while end < len(requests) and size < MAX_BATCH_BYTES:
        size += 16 + len(requests[end][2])
        end += 1
    return end


class BatchSocket:
    """A raw netlink socket of one protocol in the calling thread's network namespace."""

    def __init__(self, protocol: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def message(self, kind: int, flags: int, body: bytes) -> tuple[int, bytes]:
        self.seq += 1
        return self.seq, struct.pack("=IHHII", 16 + len(body), kind, flags, self.seq, 0) + body

    def _received(self) -> Iterator[tuple[int, int, bytes]]:
        """(type, seq, message) for each message of the next datagram the kernel sends."""
        data = self.sock.recv(1 << 20)
        offset = 0
        while offset + 16 <= len(data):
            length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
            yield kind, seq, data[offset : offset + length]
            offset += (length + 3) & ~3

    def run(self, requests: Sequence[tuple[int, int, bytes]]) -> list[str | None]:
        """Send (type, flags, body) requests in order, in batches; the error (or None) of each."""
        results: list[str | None] = [None] * len(requests)
        start = 0
        while start < len(requests):
            end = _batch_end(requests, start)
            first = self.seq + 1
            self.sock.sendall(b"".join(self._framed(requests[start:end])))
            for seq, error in self._errors(first, self.seq):
                results[start + seq - first] = error
            start = end
        return results

    def _framed(self, batch: Sequence[tuple[int, int, bytes]]) -> Iterator[bytes]:
        """Each request with its header; the last one asks for an acknowledgement."""
        for number, (kind, flags, body) in enumerate(batch, 1):
            self.seq += 1
            ack = NLM_F_ACK if number == len(batch) else 0
            yield struct.pack("=IHHII", 16 + len(body), kind, flags | NLM_F_REQUEST | ack, self.seq, 0) + body

    def _errors(self, first: int, last: int) -> Iterator[tuple[int, str]]:
        """(seq, error) of each failed request numbered `first` to `last`, until the acknowledgement of `last`."""
        while True:
            for kind, seq, data in self._received():
                if kind != NLMSG_ERROR or not first <= seq <= last:
                    continue
                code = -struct.unpack_from("=i", data, 16)[0]
                if code:
                    yield seq, describe(code)
                if seq == last:
                    return

    def dump(self, kind: int, body: bytes) -> Iterator[bytes]:
        """Every message of one dump request."""
        return self._answers(kind, NLM_F_DUMP, body)

    def query(self, kind: int, body: bytes) -> bytes | None:
        """The one answer to a plain (non-dump) get request; OSError with the kernel's error code."""
        return next(self._answers(kind, 0, body), None)

    def _answers(self, kind: int, flags: int, body: bytes) -> Iterator[bytes]:
        seq, message = self.message(kind, NLM_F_REQUEST | flags, body)
        self.sock.sendall(message)
        while True:
            for got_kind, seq_got, data in self._received():
                if seq_got != seq:
                    continue
                if got_kind == NLMSG_DONE:
                    return
                if got_kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, 16)[0]
                    if code:
                        raise OSError(code, f"netlink get: {describe(code)}")
                    return
                yield data
                if not flags & NLM_F_DUMP:
                    return
