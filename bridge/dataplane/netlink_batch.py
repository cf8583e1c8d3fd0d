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
import queue
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import NamedTuple

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


class _Batch(NamedTuple):
    """Framed requests, the sequence number of the first, and the place of each in the caller's results."""

    data: bytes
    first: int
    places: list[int]


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

    def run(self, requests: Iterable[tuple[int, int, bytes] | str]) -> list[str | None]:
        """Send (type, flags, body) requests in order, in batches; the error (or None) of each. A str in place
        of a request is that request's error (it could not be encoded): it is not sent, the rest is.

        The kernel does a request's work inside the send, so a batch keeps the sending thread in the kernel
        while Python could build the next one: with more than one batch, a second thread sends each batch and
        reads its answers, in order, while this one takes the next requests from `requests` (encoding them
        when it is lazy) and frames them. In a full apply of 500 VIPs x 20 backends in the test VM the
        kernel's part is ~2.2 s and encoding and framing ~0.7-1 s, which now hide behind it; a single batch
        (any small pass) is sent here, without a thread."""
        results: list[str | None] = []
        batches = self._batches(requests, results)
        first = next(batches, None)
        if first is None:
            return results
        second = next(batches, None)
        if second is None:
            self._send(first, results)
            return results
        sender = _Sender(partial(self._send, results=results))
        try:
            sender.put(first)
            sender.put(second)
            for batch in batches:
                sender.put(batch)
        finally:
            sender.finish()  # also when taking the next request raised: what was framed is sent first
        return results

    def _batches(self, requests: Iterable[tuple[int, int, bytes] | str], results: list[str | None]
                 ) -> Iterator[_Batch]:
        """Framed batches of up to MAX_BATCH_BYTES, each with the places of its requests in `results`, which
        gets None for each request as it is taken and the error of each request that could not be encoded."""
        pending: list[tuple[int, int, bytes]] = []
        places: list[int] = []
        size = 0
        for request in requests:
            if isinstance(request, str):
                results.append(request)
                continue
            places.append(len(results))
            results.append(None)
            pending.append(request)
            size += 16 + len(request[2])
            if size >= MAX_BATCH_BYTES:
                yield self._batch(pending, places)
                pending, places, size = [], [], 0
        if pending:
            yield self._batch(pending, places)

    def _batch(self, requests: Sequence[tuple[int, int, bytes]], places: list[int]) -> _Batch:
        first = self.seq + 1
        return _Batch(b"".join(self._framed(requests)), first, places)

    def _send(self, batch: _Batch, results: list[str | None]) -> None:
        self.sock.sendall(batch.data)
        for seq, error in self._errors(batch.first, batch.first + len(batch.places) - 1):
            results[batch.places[seq - batch.first]] = error

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


class _Sender:
    """The thread that sends a BatchSocket's batches and reads their answers, one batch at a time, in order. A
    failed send (an OSError of the socket) ends it: the batches after it are not sent and `finish` raises it,
    as the sending thread would have."""

    def __init__(self, send: Callable[[_Batch], None]) -> None:
        self._send = send
        self._queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="netlink-sender", daemon=True)
        self._thread.start()

    def put(self, batch: _Batch) -> None:
        self._queue.put(batch)

    def finish(self) -> None:
        """Wait until every batch put is sent and answered; raise what stopped the sending, if anything."""
        self._queue.put(None)
        self._thread.join()
        if self._failure is not None:
            raise self._failure

    def _work(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._failure is not None:
                continue  # drain: nothing after a failed send is sent
            try:
                self._send(batch)
            except BaseException as exc:  # handed to the caller's thread by finish()
                self._failure = exc
