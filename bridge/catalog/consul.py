"""The Consul catalog source: blocking queries on the service list and on the health of each tagged
service, following Consul's documented rules for blocking queries.

All watches share one thread running an asyncio loop (py-consul's aiohttp client): a blocking query that
waits costs nothing but its open connection, so a director watching 2,000 services idles at a re-arm
per service every `wait` (default 5 minutes, Consul's own default; at most 10). Each health answer is
turned into `Instance` values once, when it arrives, and unchanged services keep the very same objects,
which lets the agent's DesiredBook see in a glance which services changed.

Consul counts connections per client address (`limits.http_max_conns_per_client`, default 200): the
agent holds one per tagged service plus one, so a director with more tagged services needs that limit
raised on its local Consul agent; a refusal (429) says so.

* The index is reset to 0 when it goes backwards and never sent below 1; a return is not assumed to be
  a change (the content is compared).
* Each watch is rate-limited by a small token bucket, and `wait` carries jitter.
* Errors never empty the catalog: the last good answer of every watch is kept (fail static) and the
  source reports itself degraded, retrying with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp
import consul
import consul.aio
import consul.base
import requests

from bridge import clients
from bridge.catalog.consul_format import WHOLE_SERVICE, CatalogFormatError, parse_service
from bridge.catalog.source import CatalogUnavailable, OnChange
from bridge.core.config import Config, ConsulConfig
from bridge.core.model import Instance, Rejection, Snapshot
from bridge.core.printable import printable

log = logging.getLogger("maglev-bridge.consul")
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
MAX_CONNECTIONS = 1 << 20
"""aiohttp's default pool holds 100 connections; every watch needs its own for as long as it blocks."""


class ConsulAccessError(RuntimeError):
    """Consul answered, but refused: an ACL token without the permissions the agent needs."""


def read_token(config: ConsulConfig) -> str | None:
    """`token_file` first, else CONSUL_HTTP_TOKEN (as documented). Never logged."""
    return clients.read_token("consul.token_file", config.token_file, "CONSUL_HTTP_TOKEN")


def _client_options(config: ConsulConfig) -> dict[str, Any]:
    url = config.url
    return {
        "host": url.where.netloc.rpartition(":")[0], "port": url.where.port, "scheme": url.scheme,
        "token": read_token(config), "dc": config.datacenter, "verify": config.ca_file or True,
        "cert": clients.client_cert(config.cert_file, config.key_file),
        "consistency": "stale" if config.stale else "default",
    }


def _with_token(client: Any, token: str | None) -> Any:
    """py-consul lets CONSUL_HTTP_TOKEN override the token it is given; the README promises the opposite."""
    client.token = token
    return client


def make_client(config: ConsulConfig) -> consul.Consul:
    """The blocking client, for self-registration and one-off reads."""
    options = _client_options(config)
    client = _with_token(consul.Consul(**options), options["token"])
    if config.tls_server_name and config.url.scheme == "https":
        client.http.session.mount("https://", clients.ServerNameAdapter(config.tls_server_name))
    return client


def next_index(old: int, new: int) -> int:
    """Consul's rules: reset when the index goes backwards, never below 1."""
    if new < old:
        return 0
    return max(new, 1)


@dataclass
class TokenBucket:
    """Allows short bursts of immediate re-queries and then at most `rate` per second."""

    capacity: float = 5.0
    rate: float = 2.0
    tokens: float = 5.0
    stamp: float = field(default_factory=time.monotonic)

    def delay(self) -> float:
        """Take one token; the seconds to wait before using it."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class ConsulAnswerError(RuntimeError):
    """Consul answered with an error (no leader, overloaded, ...): never taken for an empty catalog."""


class TooManyRequests(ConsulAnswerError):
    """429: the local Consul agent refused the connection (limits.http_max_conns_per_client)."""


class UnreadableName(ConsulAnswerError):
    """Consul refused the request's path itself (400, 404, 405): for a health watch, a service whose name
    cannot be asked for over the HTTP API (`..`, for one). Consul answers `[]` for a service that does not
    exist, so this never passes; waiting for it would keep the whole catalog unavailable for good."""


def _parser(path: str) -> Callable[[Any], tuple[int, str]]:
    """Checks what py-consul's callbacks do not expose: a 403, or an answer that ACLs filtered, must not
    look like services having gone away."""

    def parse(response: Any) -> tuple[int, str]:
        if response.code == 403:
            raise ConsulAccessError(f"{path}: 403 {clients.summarize_body(response.body)}")
        if response.code == 429:
            raise TooManyRequests(
                f"{path}: 429 too many connections from this address; the agent holds one blocking query per "
                "tagged service plus one: raise limits.http_max_conns_per_client on the local Consul agent")
        if response.code in (400, 404, 405):
            raise UnreadableName(f"{path}: {response.code}")
        if response.code >= 400:
            raise ConsulAnswerError(f"{path}: {response.code} {clients.summarize_body(response.body)}")
        if str(response.headers.get("X-Consul-Results-Filtered-By-ACLs", "")).lower() == "true":
            raise ConsulAccessError(f"{path}: results were filtered by ACLs")
        return int(response.headers.get("X-Consul-Index", 0)), str(response.body)

    return parse


async def blocking_get(client: consul.aio.Consul, path: str, index: int, wait: str,
                       timeout: float) -> tuple[int, str]:
    """The index and the raw body: Consul's JSON is deterministic, so most re-arms (a wait that ran out
    with nothing changed) are recognised by comparing text, without decoding it. Uncompressed: the agent
    talks to its local Consul, where gzip costs both sides CPU and saves nothing."""
    params: list[tuple[str, Any]] = []
    if client.dc:
        params.append(("dc", client.dc))
    if index:
        params += [("index", index), ("wait", wait)]
    if client.consistency == "stale":
        params.append(("stale", "1"))
    headers = {**client.prepare_headers(), "Accept-Encoding": "identity"}
    result: tuple[int, str] = await client.http.get(_parser(path), path, params=params, headers=headers,
                                                    connections_timeout=timeout)
    return result


class _ServerNameHTTPClient(consul.aio.HTTPClient):  # type: ignore[misc]
    """py-consul's aiohttp client, checking Consul's certificate against `tls_server_name` (Consul's
    certificates name e.g. server.dc1.consul, not the address the agent dials)."""

    def __init__(self, *args: Any, server_name: str | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server_name = server_name

    async def _request(self, callback: Callable[[Any], Any], method: str, uri: str, headers: dict[str, str] | None,
                       data: Any = None, connections_timeout: float | None = None, raw: bool = False) -> Any:
        timeout = aiohttp.ClientTimeout(total=connections_timeout) if connections_timeout else None
        async with self._session.request(method, uri, headers=headers, data=data, timeout=timeout,
                                         server_hostname=self.server_name) as resp:
            body = await resp.text(encoding="utf-8")
            return callback(consul.base.Response(resp.status, resp.headers, body))


class _AsyncConsul(consul.aio.Consul):  # type: ignore[misc]
    def __init__(self, server_name: str | None, **kwargs: Any) -> None:
        self.server_name = server_name
        super().__init__(**kwargs)

    def http_connect(self, host: str, port: int, scheme: str, verify: bool | str = True, cert: Any = None) -> Any:
        return _ServerNameHTTPClient(host, port, scheme, verify=verify, cert=cert, connections_limit=MAX_CONNECTIONS,
                                     server_name=self.server_name)


def make_async_client(config: ConsulConfig) -> consul.aio.Consul:
    """Inside the watch loop (aiohttp sessions belong to a running loop)."""
    options = _client_options(config)
    client: consul.aio.Consul = _with_token(_AsyncConsul(config.tls_server_name, **options), options["token"])
    return client


def _describe_error(exc: Exception) -> str:
    if isinstance(exc, ConsulAccessError):
        return (f"Consul ACL: the token must be able to read every service and node (service_prefix \"\" and "
                f"node_prefix \"\" read): {exc}")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"Consul's TLS certificate was refused (check ca_file and tls_server_name): {exc}"
    if isinstance(exc, requests.ConnectionError | aiohttp.ClientConnectionError):
        return f"Consul unreachable: {exc.__class__.__name__}: {exc}"
    if isinstance(exc, asyncio.TimeoutError):
        return "Consul did not answer within the blocking query's wait: timed out"
    return f"{exc.__class__.__name__}: {exc}"


def error_kind(exc: Exception) -> str:
    """A bounded name for what went wrong, for /metrics (metrics.CONSUL_ERROR_KINDS)."""
    kinds: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
        (ConsulAccessError, "acl"), (aiohttp.ClientConnectorCertificateError, "tls"),
        ((requests.ConnectionError, aiohttp.ClientConnectionError), "unreachable"), (asyncio.TimeoutError, "timeout"),
        (TooManyRequests, "429"), (UnreadableName, "unreadable_name"), (ConsulAnswerError, "answer"),
        ((CatalogFormatError, ValueError), "format"))
    return next((kind for types, kind in kinds if isinstance(exc, types)), "other")


class Watch:
    """One blocking query as an asyncio task, calling `fetch(index, wait)` until cancelled."""

    def __init__(self, name: str, fetch: Callable[[int, str], Awaitable[tuple[int, str]]],
                 on_result: Callable[[str], None], on_error: Callable[[str, Exception], None],
                 wait_seconds: float) -> None:
        self.name = name
        self.fetch = fetch
        self.on_result = on_result
        self.on_error = on_error
        self.wait_seconds = wait_seconds
        self.index = 0
        self.bucket = TokenBucket()

    async def run(self) -> None:
        backoff = BACKOFF_START
        while True:
            pause = self.bucket.delay()
            if pause:
                await asyncio.sleep(pause)
            wait = f"{self.wait_seconds * random.uniform(0.9, 1.0):.3f}s"
            try:
                index, data = await self.fetch(self.index, wait)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.on_error(self.name, exc)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_START
            self.index = next_index(self.index, index)
            try:
                self.on_result(data)
            except Exception as exc:  # a bug must not end the watch silently: report it and keep watching
                log.exception("%s: the answer could not be taken in", printable(self.name))
                self.on_error(self.name, exc)


class ConsulSource:
    """Watches the service list for tagged services and the health of each of them."""

    def __init__(self, config: Config) -> None:
        assert config.consul is not None
        self.consul_config = config.consul
        self.vip_tag = f"{config.tag_prefix}.vip"
        self.wait_seconds = self.consul_config.wait_seconds
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._client: consul.aio.Consul | None = None
        self._tagged: set[str] | None = None
        self._instances: dict[str, tuple[Instance, ...]] = {}
        self._rejected: dict[str, tuple[Rejection, ...]] = {}
        self._bodies: dict[str, str] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._errors: dict[str, str] = {}
        self._error_counts: Counter[str] = Counter()
        self._on_change: OnChange = lambda reason: None
        self._stopped = threading.Event()
        self.changes = 0

    # ---- watches (all on the loop thread) --------------------------------------------------------

    def start(self, on_change: OnChange) -> None:
        self._on_change = on_change
        threading.Thread(target=self._watch_forever, name="consul-watch", daemon=True).start()

    def _watch_forever(self) -> None:
        """The watch loop, restarted after anything unexpected ends it (a client that cannot be built, a
        bug): the error is kept in `state()` as the service list's, so /health says the catalog is degraded
        while the last good data is kept."""
        backoff = BACKOFF_START
        while not self._stopped.is_set():
            try:
                self._loop.run_until_complete(self._main())
            except Exception as exc:
                log.exception("the Consul watch loop stopped; restarting it in %.0f s", backoff)
                self._on_error("services", exc)
                with self._lock:
                    self._tasks.clear()
                if self._stopped.wait(backoff):
                    break
                backoff = min(backoff * 2, BACKOFF_MAX)
            else:
                break

    async def _main(self) -> None:
        self._client = make_async_client(self.consul_config)
        services = Watch("services", partial(self._get, "/v1/catalog/services"), self._on_services, self._on_error,
                         self.wait_seconds)
        self._tasks["services"] = asyncio.create_task(services.run())
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass
        finally:
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            await self._client.close()

    def _get(self, path: str, index: int, wait: str) -> Awaitable[tuple[int, Any]]:
        """A client-side timeout past Consul's own (wait plus up to wait/16 of jitter) catches a dead peer."""
        assert self._client is not None
        return blocking_get(self._client, path, index, wait, self.wait_seconds * 1.1 + 15)

    def _is_tagged(self, tags: Any) -> bool:
        """Whatever shape a service's tag list has: anything but a list of strings is no tag of ours."""
        return isinstance(tags, list) and any(
            isinstance(t, str) and (t == self.vip_tag or t.startswith(self.vip_tag + "=")) for t in tags)

    def _on_services(self, body: str) -> None:
        try:
            services: Any = json.loads(body)
        except ValueError as exc:
            self._on_error("services", exc)
            return
        if not isinstance(services, dict):
            self._on_error("services", CatalogFormatError("the service list is not a JSON object"))
            return
        tagged = {name for name, tags in services.items() if self._is_tagged(tags)}
        with self._lock:
            first = self._tagged is None
            self._errors.pop("services", None)
            known = set(self._tasks) - {"services"}
            added = tagged - known
            removed = known - tagged
            self._tagged = tagged
            for name in removed:
                self._tasks.pop(name).cancel()
                self._bodies.pop(name, None)
                self._instances.pop(name, None)
                self._rejected.pop(name, None)
                self._errors.pop(f"health:{name}", None)
        for name in sorted(added):
            watch = Watch(f"health:{name}", partial(self._get, f"/v1/health/service/{name}"),
                          partial(self._on_health, name), partial(self._on_health_error, name), self.wait_seconds)
            self._tasks[name] = asyncio.create_task(watch.run())
        if removed:
            self._changed(f"consul: services no longer tagged: {', '.join(printable(n) for n in sorted(removed))}")
        elif first and not tagged:
            self._changed("consul: no tagged services")

    def _on_health(self, name: str, body: str) -> None:
        with self._lock:
            self._errors.pop(f"health:{name}", None)
            if name not in self._tasks or self._bodies.get(name) == body:
                return
        try:
            parsed = parse_service(name, body)
        except CatalogFormatError as exc:
            self._on_error(f"health:{name}", exc)
            return
        with self._lock:
            self._bodies[name] = body
            self._instances[name] = parsed.instances
            self._rejected[name] = parsed.rejected
        self._changed(f"consul: {printable(name)} changed")

    def _on_health_error(self, name: str, watch: str, exc: Exception) -> None:
        """A service Consul cannot be asked about is rejected whole, and the rest of the catalog goes on."""
        if not isinstance(exc, UnreadableName):
            self._on_error(watch, exc)
            return
        rejection = Rejection(name, WHOLE_SERVICE, "", f"Consul cannot be asked for this service's health by name "
                                                         f"({exc}); rename it to use it")
        with self._lock:
            if name not in self._tasks:
                return
            changed = self._rejected.get(name) != (rejection,)
            self._instances[name], self._rejected[name] = (), (rejection,)
            self._bodies.pop(name, None)
            self._errors.pop(watch, None)
        if changed:
            self._changed(f"consul: {printable(name)} cannot be read")

    def _on_error(self, name: str, exc: Exception) -> None:
        message = _describe_error(exc)
        with self._lock:
            self._error_counts[error_kind(exc)] += 1
            first = self._errors.get(name) != message
            self._errors[name] = message
        if first:
            level = logging.WARNING if name == "services" else logging.DEBUG
            log.log(level, "%s: %s (keeping the last good data, retrying)", printable(name), message)

    def _changed(self, reason: str) -> None:
        self.changes += 1
        self._on_change(reason)

    # ---- snapshot (any thread) -------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._tagged is None:
                raise CatalogUnavailable(self._errors.get("services", "waiting for the first service list"))
            missing = sorted(self._tagged - set(self._instances))
            if missing:
                reason = self._errors.get(f"health:{missing[0]}", "waiting for the first answer")
                raise CatalogUnavailable(
                    f"no health data yet for {len(missing)} service(s) ({printable(missing[0])}: {reason})")
            return Snapshot.of_services({name: self._instances[name] for name in self._tagged},
                                        tuple(r for name in sorted(self._tagged) for r in self._rejected[name]))

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {
                "source": "consul",
                "address": self.consul_config.address,
                "ok": not self._errors,
                "errors": dict(sorted(self._errors.items())[:20]),
                "tagged_services": len(self._tagged or ()),
                "watches": len(self._tasks),
                "error_counts": dict(self._error_counts),
                "changes": self.changes,
            }

    def stop(self) -> None:
        self._stopped.set()
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(self._loop)])
