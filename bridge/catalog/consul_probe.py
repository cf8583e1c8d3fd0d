"""The sweep's index probes, pipelined: many `GET`s on one HTTP/1.1 connection without waiting for each
answer before sending the next.

Why hand-written: aiohttp (like h11 and httpx) sends a request on a connection only once the previous answer
is in, so a sweep of 2,000 probes over a few connections costs hundreds of round trips each; on a loaded
host every round trip waits for a core, and `bench/consul_latency.py` measured registrations taking seconds
to be noticed. Consul (Go's net/http) answers pipelined requests in order. Only what these answers need is
here: the status line, three headers, and a body (Content-Length or chunked) that is read and dropped,
since a probe asks for a tag no instance carries and only its `X-Consul-Index` matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import quote, urlencode

BATCH = 64
"""Requests written at once before their answers are read: the answers of a batch fit the socket buffers,
so neither side waits on the other with full buffers."""


PATH_SAFE = "/:@!$&'()*+,;="
"""Characters a URL path keeps as they are (RFC 3986 pchar), as aiohttp sends the agent's other requests."""


class ProbeError(RuntimeError):
    """The connection broke or answered something that is not HTTP/1.1."""


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect, as the agent's other Consul requests do (token header, TLS, server name)."""

    host: str
    port: int
    tls: ssl.SSLContext | None
    server_name: str | None
    headers: Mapping[str, str]
    params: Sequence[tuple[str, str]]
    """The query every probe carries (dc, stale, the tag no instance carries)."""

    def request(self, path: str) -> bytes:
        return b"GET %s?%s HTTP/1.1\r\n%s" % (quote(path, safe=PATH_SAFE).encode("utf-8"), self._query, self._head)

    @cached_property
    def _query(self) -> bytes:
        return urlencode(self.params).encode("utf-8")

    @cached_property
    def _head(self) -> bytes:
        """The headers every probe carries, written once: the query and these are the same for every probe."""
        lines = [f"Host: {self.host}:{self.port}", "Accept-Encoding: identity",
                 *(f"{name}: {value}" for name, value in self.headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


async def probe_indexes(endpoint: Endpoint, paths: Sequence[str], timeout: float) -> AsyncGenerator[list[int], None]:
    """The `X-Consul-Index` of each path's answer, in order, a batch at a time as the answers come in (the
    caller fetches what moved while the rest is probed); -1 for an answer other than 200 (the caller reads
    that one alone and reports what is wrong). Fewer than `paths` in all when Consul closes the connection
    after an answer; ProbeError, OSError or TimeoutError when the connection breaks."""
    reader, writer = await asyncio.open_connection(
        endpoint.host, endpoint.port, ssl=endpoint.tls,
        server_hostname=(endpoint.server_name or endpoint.host) if endpoint.tls else None)
    try:
        for start in range(0, len(paths), BATCH):
            batch = paths[start:start + BATCH]
            writer.write(b"".join(endpoint.request(path) for path in batch))
            indexes: list[int] = []
            closing = False
            async with asyncio.timeout(timeout):
                await writer.drain()
                for _ in batch:
                    index, closing = await _answer(reader)
                    indexes.append(index)
                    if closing:
                        break
            yield indexes
            if closing:
                return
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """One answer: its index (-1 unless 200) and whether the server closes the connection after it. The head
    is read in one piece and split, not line by line: a sweep reads 2,000 of them, and on a loaded host each
    await of the loop costs a turn."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise ProbeError("the connection closed inside an answer") from exc
    status_line, *lines = head[:-4].split(b"\r\n")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ProbeError(f"not an HTTP/1.1 answer: {status_line[:40]!r}")
    length, chunked, index, closing = 0, False, -1, False
    for line in lines:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"x-consul-index":
            index = int(value)
        elif name == b"connection":
            closing = value.lower() == b"close"
    if chunked:
        while size := int((await reader.readline()).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readexactly(2)
    else:
        await reader.readexactly(length)
    return (index if parts[1] == b"200" else -1), closing
