"""The sweep's pipelined probes read each answer's index whatever shape its body has. Against real Consul
they run in test_consul_watch.py; here a loopback server answers in the shapes Consul does not use for an
empty body (chunked, a refusal that closes the connection), without waiting for one request to answer it."""

from __future__ import annotations

import asyncio

import pytest

from bridge.catalog.consul_probe import BATCH, Endpoint, ProbeError, probe_indexes

PLAIN = b"HTTP/1.1 200 OK\r\nX-Consul-Index: %d\r\nContent-Length: 3\r\n\r\n[]\n"
CHUNKED = b"HTTP/1.1 200 OK\r\nx-consul-index: %d\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n1\r\n\n\r\n0\r\n\r\n"
REFUSED = b"HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


def run(answers: list[bytes], paths: list[str],
        hold: int | None = None) -> tuple[list[list[int]] | Exception, list[bytes]]:
    """Serves `answers` in order, each as soon as its request is in, and records the request lines; the
    indexes come back batch by batch. With `hold`, the answers from that one on wait until the client has
    taken in a batch."""
    requests: list[bytes] = []

    async def main() -> list[list[int]] | Exception:
        taken = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for n, answer in enumerate(answers):
                if n == hold:
                    await taken.wait()
                head = await reader.readuntil(b"\r\n\r\n")
                requests.append(head.split(b"\r\n", 1)[0])
                writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        endpoint = Endpoint("127.0.0.1", port, None, None, {"X-Consul-Token": "t"}, (("filter", 'Node.Node == ""'),))
        batches = []
        try:
            async for batch in probe_indexes(endpoint, paths, timeout=10):
                batches.append(batch)
                taken.set()
            return batches
        except Exception as exc:
            return exc
        finally:
            server.close()

    return asyncio.run(main()), requests


def test_indexes_come_back_in_order_from_plain_and_chunked_answers():
    answers = [(PLAIN if n % 2 else CHUNKED) % (100 + n) for n in range(150)]
    batches, requests = run(answers, [f"/v1/health/service/svc-{n}" for n in range(150)])
    assert isinstance(batches, list)
    assert [index for batch in batches for index in batch] == [100 + n for n in range(150)]
    assert requests[3] == b"GET /v1/health/service/svc-3?filter=Node.Node+%3D%3D+%22%22 HTTP/1.1"


def test_an_answer_other_than_200_asks_for_a_read_of_its_own_and_a_closing_one_ends_the_probe():
    batches, _ = run([PLAIN % 7, REFUSED], ["/a", "/b", "/c"])
    assert batches == [[7, -1]], "the third path is left to the next sweep"


def test_a_connection_that_breaks_inside_an_answer_is_an_error():
    batches, _ = run([b"HTTP/1.1 200 OK\r\nContent-"], ["/a"])
    assert isinstance(batches, ProbeError)


@pytest.mark.parametrize("garbage", [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n"])
def test_something_that_is_not_http_is_an_error(garbage):
    batches, _ = run([garbage], ["/a"])
    assert isinstance(batches, ProbeError)


def test_a_batch_of_indexes_is_handed_over_before_the_next_batch_is_answered():
    """The sweep fetches the services that moved while the rest are probed, not once the sweep ends."""
    answers = [PLAIN % n for n in range(2 * BATCH)]
    batches, _ = run(answers, [f"/{n}" for n in range(2 * BATCH)], hold=BATCH)
    assert batches == [list(range(BATCH)), list(range(BATCH, 2 * BATCH))]
