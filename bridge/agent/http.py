"""The agent's small HTTP endpoint: /health for Consul's check (ready only after the first complete
pass, 503 otherwise; 429 while the director is in maintenance, which Consul shows as a warning whether the
agent registered itself or Nomad registered it), /status, the same data as
`maglev-bridge status --format json` plus the agent's own state, and /metrics for Prometheus
(bridge.inspect.metrics).

aiohttp (already here for the Consul watches) in one thread of its own, because nothing a client does may
hold the agent: a connection costs a coroutine, not a thread, so many slow or silent clients do not keep
/health from answering; a connection that has not sent a whole request within IDLE_SECONDS is closed;
/status and /metrics, which read the kernel, run on a pool of STATUS_WORKERS threads with a deadline. The stdlib
server it replaces used a thread per connection, no timeout and a listen backlog of 5.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bridge.core.config import ConfigError
from bridge.inspect.metrics import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from bridge.agent.shell import Agent

log = logging.getLogger("maglev-bridge.http")
IDLE_SECONDS = 5.0
"""A connection without a complete request for this long is closed (also between keep-alive requests)."""
STATUS_WORKERS = 2
STATUS_SECONDS = 30.0
BACKLOG = 128
SHUTDOWN_SECONDS = 2.0


def _status(agent: Agent) -> dict[str, Any]:
    from bridge.inspect.status import read_status

    data = read_status(agent.config)
    data["agent"] = agent.health()
    return data


def _json(code: int, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=code, dumps=lambda data: json.dumps(data, indent=1))


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


class HttpEndpoint:
    """Serves until `stop()`; `start()` returns once the socket listens, or raises ConfigError naming
    http_bind when it cannot (address in use, not an address of this host)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._loop = asyncio.new_event_loop()
        self._pool = ThreadPoolExecutor(STATUS_WORKERS, thread_name_prefix="http-status")
        self._runner: web.AppRunner | None = None

    async def _health(self, _request: web.Request) -> web.Response:
        health = self.agent.health()
        return _json(503 if not health["ready"] else 429 if health["maintenance"]["on"] else 200, health)

    async def _status(self, _request: web.Request) -> web.Response:
        try:
            data = await asyncio.wait_for(self._loop.run_in_executor(self._pool, _status, self.agent), STATUS_SECONDS)
        except TimeoutError:
            return _json(503, {"error": f"status did not complete within {STATUS_SECONDS:.0f} s"})
        except Exception as exc:
            return _json(500, {"error": f"status failed: {exc.__class__.__name__}: {exc}"})
        return _json(200, data)

    async def _metrics(self, _request: web.Request) -> web.Response:
        try:
            body = await asyncio.wait_for(self._loop.run_in_executor(self._pool, self.agent.metrics.exposition),
                                          STATUS_SECONDS)
        except TimeoutError:
            return web.Response(status=503, text=f"metrics did not complete within {STATUS_SECONDS:.0f} s\n")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _other(self, request: web.Request) -> web.Response:
        return _json(404, {"error": f"no such endpoint {request.path[:100]}; try /health, /status or /metrics"})

    async def _listen(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/{tail:.*}", self._other)
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=IDLE_SECONDS, handle_signals=False,
                                     shutdown_timeout=SHUTDOWN_SECONDS)
        await self._runner.setup()
        address = self.agent.config.http_address
        await web.TCPSite(self._runner, address.host, address.port, backlog=BACKLOG, reuse_address=True).start()

    def start(self) -> None:
        address = self.agent.config.http_address
        try:
            self._loop.run_until_complete(self._listen())
        except OSError as exc:
            raise ConfigError(f"http_bind: cannot listen on {address.netloc}: {exc.strerror or exc}") from None
        threading.Thread(target=self._loop.run_forever, name="http", daemon=True).start()
        if not is_loopback(address.host):
            log.warning("http_bind %s is not a loopback address: /status shows this director's services, backends "
                        "and tunnels to anyone who can reach it", address.netloc)

    def stop(self) -> None:
        """Stops listening; a request still running is cut after SHUTDOWN_SECONDS (the agent is stopping)."""
        if self._runner is not None and self._loop.is_running():
            done = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            try:
                done.result(timeout=SHUTDOWN_SECONDS + 5)
            except Exception as exc:
                log.warning("HTTP endpoint did not stop cleanly: %s", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._pool.shutdown(wait=False, cancel_futures=True)


def serve(agent: Agent) -> HttpEndpoint:
    endpoint = HttpEndpoint(agent)
    endpoint.start()
    return endpoint
