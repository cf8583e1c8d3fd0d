"""Batched netlink requests (bridge/dataplane/netlink_batch.py) against a stand-in for the kernel's side of the
socket: with more than one batch a second thread sends while the caller encodes, and the caller must not be able
to tell. The real kernel's answers are checked in tests/kernel/test_netlink_batch.py."""

from __future__ import annotations

import errno
import struct
import threading
from collections.abc import Iterator

import pytest

from bridge.dataplane.netlink_batch import MAX_BATCH_BYTES, NLM_F_ACK, NLMSG_ERROR, BatchSocket, describe

REFUSED = b"refused!"
"""A body the stand-in kernel refuses (EEXIST), as IPVS refuses a real server it already has (bodies are whole
4-byte words, as every netlink message's is)."""


class Kernel:
    """Processes each datagram's requests in order like netlink_rcv_skb: an error message for a failure whether
    asked or not, an acknowledgement when asked; records the sequence numbers it saw and the sending threads."""

    def __init__(self, fail_on_send: int | None = None) -> None:
        self.seen: list[int] = []
        self.threads: set[str] = set()
        self.sends = 0
        self.fail_on_send = fail_on_send
        self._answers: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sends += 1
        self.threads.add(threading.current_thread().name)
        if self.sends == self.fail_on_send:
            raise OSError(errno.ENOBUFS, "No buffer space available")
        offset, answer = 0, b""
        while offset < len(data):
            length, _kind, flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
            body = data[offset + 16: offset + length]
            self.seen.append(seq)
            code = -errno.EEXIST if body == REFUSED else 0
            if code or flags & NLM_F_ACK:
                answer += struct.pack("=IHHII", 36, NLMSG_ERROR, 0, seq, 0) + struct.pack("=i16x", code)
            offset += (length + 3) & ~3
        self._answers.append(answer)

    def recv(self, size: int) -> bytes:
        return self._answers.pop(0)


def socket_to(kernel: Kernel) -> BatchSocket:
    batch = BatchSocket.__new__(BatchSocket)
    batch.sock = kernel  # type: ignore[assignment]
    batch.seq = 0
    return batch


BODY = b"x" * 96
MANY = 3 * MAX_BATCH_BYTES // (16 + len(BODY))
"""Requests enough for several batches."""


def test_several_batches_report_each_failure_and_each_unencodable_request_at_its_place() -> None:
    kernel = Kernel()
    refused = {5, 700, MANY - 1}
    unencodable = {0, 300, 301}
    requests: list[tuple[int, int, bytes] | str] = [
        "cannot encode" if i in unencodable else (30, 0, REFUSED if i in refused else BODY) for i in range(MANY)]
    results = socket_to(kernel).run(iter(requests))
    assert len(results) == MANY
    assert {i: r for i, r in enumerate(results) if r} == {
        **{i: describe(errno.EEXIST) for i in refused}, **{i: "cannot encode" for i in unencodable}}
    assert kernel.seen == list(range(1, MANY - len(unencodable) + 1)), "every encodable request, in order, once"
    assert kernel.sends > 2 and kernel.threads == {"netlink-sender"}


def test_one_batch_is_sent_by_the_calling_thread() -> None:
    kernel = Kernel()
    assert socket_to(kernel).run([(30, 0, BODY), (30, 0, REFUSED)]) == [None, describe(errno.EEXIST)]
    assert kernel.threads == {threading.current_thread().name}


def test_a_failed_send_stops_the_batches_after_it_and_reaches_the_caller() -> None:
    kernel = Kernel(fail_on_send=2)
    with pytest.raises(OSError, match="No buffer space"):
        socket_to(kernel).run((30, 0, BODY) for _ in range(MANY))
    assert kernel.sends == 2, "nothing after the failed send"


def test_what_was_taken_before_the_requests_ran_out_with_an_error_is_sent_before_the_error_is_raised() -> None:
    kernel = Kernel()

    def requests() -> Iterator[tuple[int, int, bytes]]:
        for _ in range(MANY):
            yield 30, 0, BODY
        raise RuntimeError("a bug while encoding")

    with pytest.raises(RuntimeError, match="a bug"):
        socket_to(kernel).run(requests())
    assert kernel.seen, "the full batches taken before the error were sent"
    assert kernel.threads == {"netlink-sender"}
