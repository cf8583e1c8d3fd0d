"""The Consul catalog source: a fixed number of HTTP connections to the local Consul agent, however many
services carry the vip tag, following Consul's documented rules for blocking queries.

Why not one blocking query per tagged service: each holds a connection, and the local agent allows 200 per
client address (`limits.http_max_conns_per_client`), shared with Nomad and everything else on 127.0.0.1.
Consul's streaming backend (`?cached`) spares the servers, not those connections, and no public endpoint
says which service an index belongs to (`filter` has no selector for ModifyIndex). Measured on Consul
1.16.3 (docs/consul-watch.md): an address, port or tag edit of an instance moves only the service list's
index (the checks of an instance are re-written only when its check is sent along and differs), a
deregistration moves the checks' index without a failing check changing, and a node's address edit moves
only the node list's index; each of them moves the index of the services involved. So four blocking
queries ("feeds") say *that*, and sometimes *which*, something changed, and a bounded pool asks only for
what moved:

* the service list (`/v1/catalog/services`): which services are tagged; a service new to it, or whose tags
  changed, is fetched at once, and any answer starts a sweep;
* the critical and the warning checks (`/v1/health/state/critical`, `.../warning`, small in a healthy
  fleet): a check that starts or stops failing, of an instance or of a node, names the services to fetch at once,
  which keeps health changes as fast as a watch of their own;
* the node list, filtered to nothing (`/v1/catalog/nodes`): only its index, which moves when a node's
  address changes; a move starts a sweep.

A sweep asks every tagged service for its index alone (`/v1/catalog/service/<name>` asked for a tag no
instance carries: an empty body; the same index as its health, cheaper for Consul: PROBE_TAG), pipelined on
half of the remaining connections (bridge/catalog/consul_probe.py), and fetches the services whose index
moved on the other half, where the failing-check fetches go too, as soon as their batch of probes is
answered, not when the sweep ends. The services whose index moved most recently are probed first: a service
in the middle of a change (a rolling deploy, a registration followed by its deregistration) is found in the
first batch. Sweeps never overlap and send at most SWEEP_RATE probes a second over the long run. Each of them
comes after a sweep of the local agent's cache (`?cached`, CACHED), and another runs for each change a feed
reports while the budgeted sweep waits for its budget: they find most changes sooner, without a read on the
Consul servers, and the budgeted sweep still follows, so nothing rests on the cache being current.
`max_connections` bounds feeds, probes and fetches together, idle keep-alive connections included. Each
health answer is turned into `Instance` values once, when it arrives, and an answer that folds to the same
instances keeps the very same objects, which lets the agent's DesiredBook see in a glance which services
changed.

* The index is reset to 0 when it goes backwards and never sent below 1; a return is not assumed to be
  a change (the content is compared).
* Each feed is rate-limited by a small token bucket, and `wait` carries jitter.
* Errors never empty the catalog: the last good answer of every service is kept (fail static) and the
  source reports itself degraded, retrying with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import aiohttp
import consul
import consul.aio
import consul.base
import requests

from bridge import clients
from bridge.catalog.consul_format import (
    WHOLE_SERVICE,
    CatalogFormatError,
    CheckState,
    carries_tag,
    parse_checks,
    parse_service,
)
from bridge.catalog.consul_probe import Endpoint, ProbeError, probe_indexes
from bridge.catalog.source import CatalogUnavailable, OnChange
from bridge.core.config import CONSUL_FEEDS, Config, ConsulConfig
from bridge.core.model import Instance, Rejection, Snapshot
from bridge.core.printable import printable

log = logging.getLogger("maglev-bridge.consul")
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
FEEDS = CONSUL_FEEDS
FAILING = ("critical", "warning")
"""`/v1/health/state/<state>` for each: Consul reads them from its index by status, where `state/any` with
a filter builds and filters every check of the datacenter on each change (10,000 at 2,000 x 5)."""
NO_NODE = 'Node == ""'
"""A filter that matches no node or instance: the answer is `[]` and only its index says anything (nodes
always have names)."""
PROBE_TAG = "maglev-bridge.probe"
"""A tag no instance is expected to carry: a sweep's probe asks a service for the instances that carry it, so
the answer is `[]` and only its index says anything (an instance that did carry it would make the answer
longer, never its index wrong). Consul picks instances by tag in its state store; the first version's
`filter=Node == ""` (go-bexpr, compiled for every request) cost the local agent 3.5x the CPU: 670 against
190 ms for 2,000 probes, a sweep of 2,477 against 565 ms at load 9 on 2 cores."""
READ_TIMEOUT = 30.0
CACHED = ("cached", "")
"""Asks the local Consul agent to answer from its cache (background refresh: one blocking query per entry to
the servers, which wakes only when that service changes). Measured at 2,000 x 5 with a client agent joined
to a server (docs/consul-watch.md): a sweep of 2,000 probes costs the local agent 110 ms of CPU and the
server none, against 240 ms and 200 ms uncached; 2,000 entries cost nothing measurable while idle."""


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
    """Allows short bursts of immediate re-queries and then at most `rate` per second. Each feed carries the
    changes of the whole catalog, not of one service: at 2 a second (the per-service watches' rate) a fleet
    changing more often would queue its health changes behind the bucket; 10 a second still stops a feed
    that Consul answers at once from spinning."""

    capacity: float = 20.0
    rate: float = 10.0
    tokens: float = 20.0
    stamp: float = field(default_factory=time.monotonic)

    def delay(self, cost: float = 1.0) -> float:
        """Take `cost` tokens; the seconds to wait before using them."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= cost
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def spend(self, probes: int) -> None:
        """A sweep's probes, paid once it ends; the bucket holds up to SWEEP_BURST sweeps of that size."""
        self.capacity = SWEEP_BURST * probes
        self.tokens -= probes


SWEEP_RATE = 3000.0
SWEEP_BURST = 2.0
"""Sweeps send at most SWEEP_RATE probes a second over the long run, however busy the rest of the catalog is,
yet start at once after a quiet spell: the probes of a sweep are earned back at SWEEP_RATE a second, up to two
sweeps in advance. Every probe costs the local Consul agent (and the servers it forwards to) about the same
CPU whatever the load on the host, so the budget counts probes. A first version counted the sweeps' wall time
(a quarter of it): under CPU contention a sweep took seconds, and its rest four times as long, so a
registration waited ~10 s (bench/consul_latency.py); a fixed rest after each sweep (four times its length, in
a version before) made a registration that came after another wait seconds."""
CACHE_SWEEP_RATE = 6000.0
"""The budget of the sweeps of the local agent's cache (CACHED), which cost the Consul servers nothing and the
local agent 55-80 us a probe: at most ~0.33-0.48 of a core of the local agent under sustained churn. Twice
SWEEP_RATE: a catalog that changes at the budgeted sweeps' own rate (bench/consul_latency.py) still gets one
sweep of the cache for each change; with the same rate the cache's budget ran short exactly when the other
one did, and registrations waited as before (p50 268 ms, p99 578 ms, against 118 / 391 ms with one sweep of
the cache at the start of each wait, at load 2.8-2.9)."""


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
                f"{path}: 429 too many connections from this address: lower consul.max_connections or raise "
                "limits.http_max_conns_per_client on the local Consul agent (other clients on this address, "
                "Nomad among them, count too)")
        if response.code in (400, 404, 405):
            raise UnreadableName(f"{path}: {response.code}")
        if response.code >= 400:
            raise ConsulAnswerError(f"{path}: {response.code} {clients.summarize_body(response.body)}")
        if str(response.headers.get("X-Consul-Results-Filtered-By-ACLs", "")).lower() == "true":
            raise ConsulAccessError(f"{path}: results were filtered by ACLs")
        return int(response.headers.get("X-Consul-Index", 0)), str(response.body)

    return parse


async def blocking_get(client: consul.aio.Consul, path: str, index: int, wait: str,
                       timeout: float, query_filter: str | None = None) -> tuple[int, str]:
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
    if query_filter:
        params.append(("filter", query_filter))
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
    def __init__(self, server_name: str | None, connections: int, **kwargs: Any) -> None:
        self.server_name = server_name
        self.connections = connections
        super().__init__(**kwargs)

    def http_connect(self, host: str, port: int, scheme: str, verify: bool | str = True, cert: Any = None) -> Any:
        return _ServerNameHTTPClient(host, port, scheme, verify=verify, cert=cert, connections_limit=self.connections,
                                     server_name=self.server_name)


def make_async_client(config: ConsulConfig, connections: int) -> consul.aio.Consul:
    """Inside the watch loop (aiohttp sessions belong to a running loop). Its pool never opens more than
    `connections`, idle keep-alive connections included."""
    options = _client_options(config)
    client: consul.aio.Consul = _with_token(_AsyncConsul(config.tls_server_name, connections, **options),
                                            options["token"])
    return client


def probe_endpoint(config: ConsulConfig, client: consul.aio.Consul) -> Endpoint:
    """The sweep's probes go where the client goes, with its token, TLS files and query options."""
    tls = None
    if config.url.scheme == "https":
        tls = ssl.create_default_context(cafile=config.ca_file)
        cert = clients.client_cert(config.cert_file, config.key_file)
        if cert:
            tls.load_cert_chain(*cert)
    params = [("dc", client.dc)] if client.dc else []
    if client.consistency == "stale":
        params.append(("stale", "1"))
    return Endpoint(config.url.where.netloc.rpartition(":")[0].strip("[]"), config.url.where.port or 8500, tls,
                    config.tls_server_name, client.prepare_headers(), (*params, ("tag", PROBE_TAG)))


def describe_error(exc: Exception) -> str:
    if isinstance(exc, ConsulAccessError):
        return (f"Consul ACL: the token must be able to read every service and node (service_prefix \"\" and "
                f"node_prefix \"\" read): {exc}")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError):
        return f"Consul's TLS certificate was refused (check ca_file and tls_server_name): {exc}"
    if isinstance(exc, asyncio.TimeoutError):  # before OSError, whose subclass it is
        return "Consul did not answer within the blocking query's wait: timed out"
    if isinstance(exc, requests.ConnectionError | aiohttp.ClientConnectionError | OSError):
        return f"Consul unreachable: {exc.__class__.__name__}: {exc}"
    return f"{exc.__class__.__name__}: {exc}"


def error_kind(exc: Exception) -> str:
    """A bounded name for what went wrong, for /metrics (metrics.CONSUL_ERROR_KINDS)."""
    kinds: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
        (ConsulAccessError, "acl"), ((aiohttp.ClientConnectorCertificateError, ssl.SSLError), "tls"),
        (asyncio.TimeoutError, "timeout"),  # before OSError, whose subclass it is
        ((requests.ConnectionError, aiohttp.ClientConnectionError, OSError), "unreachable"), (TooManyRequests, "429"),
        (UnreadableName, "unreadable_name"),
        ((ConsulAnswerError, ProbeError), "answer"),
        ((CatalogFormatError, ValueError), "format"))
    return next((kind for types, kind in kinds if isinstance(exc, types)), "other")


class Watch:
    """One blocking query as an asyncio task, calling `fetch(index, wait)` until cancelled; `on_result` gets
    the index and the body of each answer. After a failed request the next one does not block (index 0):
    Consul back with the same index (a restart that lost and changed nothing) would otherwise hold it for a
    whole `wait`, up to 10 minutes, while /health still reported the failure."""

    def __init__(self, name: str, fetch: Callable[[int, str], Awaitable[tuple[int, str]]],
                 on_result: Callable[[int, str], None], on_error: Callable[[str, Exception], None],
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
        failed = False
        while True:
            pause = self.bucket.delay()
            if pause:
                await asyncio.sleep(pause)
            wait = f"{self.wait_seconds * random.uniform(0.9, 1.0):.3f}s"
            try:
                index, data = await self.fetch(0 if failed else self.index, wait)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.on_error(self.name, exc)
                failed = True
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_START
            failed = False
            self.index = next_index(self.index, index)
            try:
                self.on_result(index, data)
            except Exception as exc:  # a bug must not end the watch silently: report it and keep watching
                log.exception("%s: the answer could not be taken in", printable(self.name))
                self.on_error(self.name, exc)


def run_forever(loop: asyncio.AbstractEventLoop, main: Callable[[], Coroutine[Any, Any, None]],
                stopped: threading.Event, crashed: Callable[[Exception], None]) -> None:
    """A watch loop, restarted with capped backoff after anything unexpected ends it (a client that cannot
    be built, a bug), until `stopped`; `crashed` keeps the error for /health."""
    backoff = BACKOFF_START
    while not stopped.is_set():
        try:
            loop.run_until_complete(main())
        except Exception as exc:
            log.exception("the Consul watch loop stopped; restarting it in %.0f s", backoff)
            crashed(exc)
            if stopped.wait(backoff):
                break
            backoff = min(backoff * 2, BACKOFF_MAX)
        else:
            break


def stop_loop(loop: asyncio.AbstractEventLoop, stopped: threading.Event) -> None:
    """Ends `run_forever` from any thread: every task of the loop is cancelled."""
    stopped.set()
    if loop.is_running():
        loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(loop)])


class ConsulSource:
    """Watches the tagged services' health through four change feeds and a bounded pool of reads."""

    def __init__(self, config: Config) -> None:
        assert config.consul is not None
        self.consul_config = config.consul
        self.vip_tag = f"{config.tag_prefix}.vip"
        self.wait_seconds = self.consul_config.wait_seconds
        pool = self.consul_config.max_connections - FEEDS
        self.probers = pool // 2
        """Connections a sweep probes on (pipelined); the rest of the pool fetches."""
        self.fetchers = pool - self.probers
        self._endpoint: Endpoint | None = None
        self._cached_endpoint: Endpoint | None = None
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._client: consul.aio.Consul | None = None
        self._tagged: set[str] | None = None
        self._instances: dict[str, tuple[Instance, ...]] = {}
        self._rejected: dict[str, tuple[Rejection, ...]] = {}
        self._indexes: dict[str, int] = {}
        """Each service's index at its last answer that was taken in; a sweep fetches it again when it moves."""
        self._tags: dict[str, frozenset[str]] = {}
        """Each tagged service's tags in the last service list (those of all its instances, in an order that
        changes from one answer to the next): a service whose tags change is fetched at once."""
        self._moved: dict[str, int] = {}
        self._moves = 0
        """When each service's index last moved (a count of moves): sweeps probe the latest first, since a
        service that just changed (a rolling deploy, a registration and its deregistration) is the likeliest
        to change again."""
        self._unreadable: set[str] = set()
        self._failing: dict[str, dict[tuple[str, str], CheckState]] = {}
        self._fetching: set[str] = set()
        self._again: set[str] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None
        self._sweep_wanted: asyncio.Event | None = None
        self._cache_wanted: asyncio.Event | None = None
        self._sweep_asked = 0
        self._sweep_covers = 0
        self._cache_covers = 0
        """The highest index a feed had seen when it asked for a sweep, and that of the sweep under way or
        last begun, budgeted or of the agent's cache: a sweep begun after a feed saw an index finds every
        change up to it. A sweep of the cache is wanted only for an index past the last one's, so the two or
        three feeds that wake for one edit start one, not three."""
        self._errors: dict[str, str] = {}
        self._error_counts: Counter[str] = Counter()
        self._on_change: OnChange = lambda reason: None
        self._stopped = threading.Event()
        self._in_use = 0
        self._peak = 0
        self.changes = 0
        self.sweeps = 0
        self.cached_sweeps = 0
        self.reads = 0

    # ---- feeds (all on the loop thread) ----------------------------------------------------------

    def start(self, on_change: OnChange) -> None:
        self._on_change = on_change
        threading.Thread(target=self._watch_forever, name="consul-watch", daemon=True).start()

    def _watch_forever(self) -> None:
        """The error of a crashed loop is kept in `state()` as the service list's, so /health says the
        catalog is degraded while the last good data is kept."""
        run_forever(self._loop, self._main, self._stopped, self._crashed)

    def _crashed(self, exc: Exception) -> None:
        self._on_error("services", exc)
        with self._lock:
            self._tasks.clear()

    async def _main(self) -> None:
        self._client = make_async_client(self.consul_config, FEEDS + self.fetchers)
        self._endpoint = probe_endpoint(self.consul_config, self._client)
        self._cached_endpoint = replace(self._endpoint, params=(*self._endpoint.params, CACHED))
        self._slots = asyncio.Semaphore(self.fetchers)
        self._sweep_wanted = asyncio.Event()
        self._cache_wanted = asyncio.Event()
        self._failing = {}
        self._sweep_asked = self._sweep_covers = self._cache_covers = 0
        feeds = (
            Watch("services", partial(self._get, "/v1/catalog/services", None), self._on_services, self._on_error,
                  self.wait_seconds),
            *(Watch(state, partial(self._get, f"/v1/health/state/{state}", None),
                    partial(self._on_failing_checks, state), self._on_error, self.wait_seconds) for state in FAILING),
            Watch("nodes", partial(self._get, "/v1/catalog/nodes", NO_NODE), self._on_nodes, self._on_error,
                  self.wait_seconds),
        )
        with self._lock:
            for feed in feeds:
                self._tasks[feed.name] = asyncio.create_task(feed.run())
        sweeper = asyncio.create_task(self._sweep_forever())
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass
        finally:
            with self._lock:
                tasks = [*self._tasks.values(), *self._background, sweeper]
                self._tasks.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._client.close()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[None]:
        """Every request or connection to Consul, counted: `state()` reports those in use and the most ever."""
        self._in_use += 1
        self._peak = max(self._peak, self._in_use)
        try:
            yield
        finally:
            self._in_use -= 1

    async def _request(self, path: str, index: int, wait: str, timeout: float,
                       query_filter: str | None) -> tuple[int, str]:
        assert self._client is not None
        with self._connection():
            return await blocking_get(self._client, path, index, wait, timeout, query_filter)

    def _get(self, path: str, query_filter: str | None, index: int, wait: str) -> Awaitable[tuple[int, str]]:
        """A feed's blocking query. A client-side timeout past Consul's own (wait plus up to wait/16 of
        jitter) catches a dead peer."""
        return self._request(path, index, wait, self.wait_seconds * 1.1 + 15, query_filter)

    async def _fetch(self, name: str) -> tuple[int, str]:
        """One service's health through the pool (at most `fetchers` at once). A request for the same service
        that came while this one waited for its turn is answered by it."""
        assert self._slots is not None
        async with self._slots:
            self._again.discard(name)
            self.reads += 1
            return await self._request(f"/v1/health/service/{name}", 0, "", READ_TIMEOUT, None)

    def _is_tagged(self, tags: Any) -> bool:
        """Whatever shape a service's tag list has: anything but a list of strings is no tag of ours."""
        return carries_tag(tags, self.vip_tag)

    def _want_sweep(self, index: int | None = None) -> None:
        """A sweep, unless one begun since a feed saw `index` covers it (the node list's index moves with
        the service list's: one edit, one sweep). Without an index, always; the cache's sweep only for an
        index no sweep of the cache has begun since."""
        assert self._sweep_wanted is not None and self._cache_wanted is not None
        if index is not None:
            if 0 < index <= self._sweep_covers:
                return
            self._sweep_asked = max(self._sweep_asked, index)
        self._sweep_wanted.set()
        if self._sweep_asked > self._cache_covers:
            self._cache_wanted.set()

    def _on_services(self, index: int, body: str) -> None:
        """Every answer starts a sweep, the re-arm after `wait` too: what a feed could not say is found
        within one `wait` whatever happens."""
        try:
            services: Any = json.loads(body)
        except ValueError as exc:
            self._on_error("services", exc)
            return
        if not isinstance(services, dict):
            self._on_error("services", CatalogFormatError("the service list is not a JSON object"))
            return
        tags = {name: frozenset(t for t in tags if isinstance(t, str))  # Consul lists them in any order
                for name, tags in services.items() if self._is_tagged(tags)}
        tagged = set(tags)
        self._sweep_asked = max(self._sweep_asked, index)
        with self._lock:
            first = self._tagged is None
            self._errors.pop("services", None)
            removed = (self._tagged or set()) - tagged
            self._tagged = tagged
            for name in removed:
                for table in (self._instances, self._rejected, self._indexes, self._moved):
                    table.pop(name, None)
                self._unreadable.discard(name)
                self._errors.pop(f"health:{name}", None)
            named = sorted(name for name in tagged - self._unreadable
                           if name not in self._indexes or tags[name] != self._tags.get(name))
            self._tags = tags
        for name in named:  # new, or its tags changed: this answer says which, no need to wait for the sweep
            self._spawn(self._refresh(name))
        self._want_sweep()
        if removed:
            self._changed(f"consul: services no longer tagged: {', '.join(printable(n) for n in sorted(removed))}")
        elif first and not tagged:
            self._changed("consul: no tagged services")

    def _on_nodes(self, index: int, body: str) -> None:
        with self._lock:
            self._errors.pop("nodes", None)
        self._want_sweep(index)

    def _on_failing_checks(self, state: str, index: int, body: str) -> None:
        """Checks that came into or left `state`, or changed in it: their services are fetched at once, and
        a node's own check means every tagged service with an instance on that node."""
        try:
            failing = parse_checks(body)
        except CatalogFormatError as exc:
            self._on_error(state, exc)
            self._want_sweep()
            return
        with self._lock:
            self._errors.pop(state, None)
            before = self._failing.get(state)
            self._failing[state] = failing
        if before is None:  # a first answer says nothing about what changed before it
            self._want_sweep()
            return
        services: set[str] = set()
        nodes: set[str] = set()
        for key in before.keys() | failing.keys():
            if before.get(key) != failing.get(key):
                check = failing.get(key) or before[key]
                if check.ServiceName:
                    services.add(check.ServiceName)
                else:
                    nodes.add(check.Node)
        with self._lock:
            if nodes:
                services.update(name for name, found in self._instances.items()
                                if any(instance.node in nodes for instance in found))
            wanted = services & (self._tagged or set())
        for name in sorted(wanted):
            self._spawn(self._refresh(name))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- reads through the pool ------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        """Sweeps one after another within their budget (SWEEP_RATE); after a failed one (Consul away) the next
        waits with capped exponential backoff."""
        assert self._sweep_wanted is not None
        backoff = BACKOFF_START
        budget = TokenBucket(capacity=0.0, rate=SWEEP_RATE, tokens=0.0)  # probes, paid once a sweep ends
        cache_budget = TokenBucket(capacity=0.0, rate=CACHE_SWEEP_RATE, tokens=0.0)
        while True:
            await self._sweep_wanted.wait()
            await self._sweep_cache_until(time.monotonic() + budget.delay(0.0), cache_budget)
            self._sweep_wanted.clear()
            self._sweep_covers = self._sweep_asked
            try:
                probes = await self._sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._on_error("sweep", exc)
                self._want_sweep()
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_START
            with self._lock:
                self._errors.pop("sweep", None)
            self.sweeps += 1
            budget.spend(probes)

    async def _sweep_cache_until(self, until: float, budget: TokenBucket) -> None:
        """Sweeps of the local agent's cache, which cost the Consul servers nothing and take about half as
        long as the budgeted sweep: one at once, then one for each new index a feed reports until `until`
        (monotonic), while the budgeted sweep waits for its budget. A service whose cached index moved past
        the one taken in is fetched at once (the fetch itself is never cached). The cache may lag a change by
        a moment, so these sweeps only add early fetches: the budgeted sweep that follows is what proves
        nothing was missed. They have a budget of their own for the local agent's CPU (CACHE_SWEEP_RATE);
        when it does not allow one before `until`, the budgeted sweep goes alone."""
        assert self._cache_wanted is not None
        while True:
            rest = until - time.monotonic()
            if self._cache_wanted.is_set():
                pause = budget.delay(0.0)
                if not pause or pause < rest:
                    await asyncio.sleep(pause)
                    budget.spend(await self._sweep_cache())
                    continue
                await asyncio.sleep(max(rest, 0.0))
                return
            if rest <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(rest):
                    await self._cache_wanted.wait()

    async def _sweep_cache(self) -> int:
        """One sweep of the local agent's cache; the number of probes sent (0 when it failed: the budgeted
        sweep follows and reports its own errors)."""
        assert self._cache_wanted is not None
        self._cache_wanted.clear()
        self._cache_covers = self._sweep_asked
        try:
            probes = await self._sweep(cached=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("sweep of the agent's cache: %s", describe_error(exc))
            return 0
        self.cached_sweeps += 1
        return probes

    async def _sweep(self, cached: bool = False) -> int:
        """The index of every tagged service alone, probed on `probers` connections at once, and a fetch of
        those that moved; services never taken in are fetched without a probe. The number of probes sent.
        `cached`: the probes ask the local agent's cache (CACHED), and only an index past the one
        taken in counts as moved, since the cache may lag."""
        with self._lock:
            watched = sorted((self._tagged or set()) - self._unreadable)
            known = sorted((name for name in watched if name in self._indexes),
                           key=lambda name: -self._moved.get(name, 0))
            unknown = [name for name in watched if name not in self._indexes and name not in self._fetching]
        for name in unknown:
            self._spawn(self._refresh(name))
        parts = await asyncio.gather(*(self._probe(known[n::self.probers], cached) for n in range(self.probers)))
        if not all(parts) and not cached:  # Consul closed a connection early: the rest at the next sweep
            self._want_sweep()
        return len(known)

    async def _probe(self, names: list[str], cached: bool) -> bool:
        """Probes `names` on one pipelined connection and fetches those whose index moved as soon as their
        batch is answered, while the rest is probed; False when the connection ended before every answer was
        in."""
        if not names:
            return True
        endpoint = self._cached_endpoint if cached else self._endpoint
        assert endpoint is not None
        done = 0
        paths = [f"/v1/catalog/service/{name}" for name in names]
        with self._connection():
            async with contextlib.aclosing(probe_indexes(endpoint, paths, READ_TIMEOUT)) as answers:
                async for indexes in answers:  # closed at once, whatever ends the loop
                    batch, done = names[done:done + len(indexes)], done + len(indexes)
                    self.reads += len(indexes)
                    with self._lock:
                        moved = [name for name, index in zip(batch, indexes, strict=True)
                                 if (index > self._indexes.get(name, index) if cached
                                     else index != self._indexes.get(name))]
                    for name in moved:
                        self._spawn(self._refresh(name))
        return done == len(names)

    async def _refresh(self, name: str) -> None:
        """Fetch one service's health until an answer is taken in. One fetch per service at a time: asked
        again while one is under way, it fetches once more after it."""
        if name in self._fetching:
            self._again.add(name)
            return
        self._fetching.add(name)
        backoff = BACKOFF_START
        try:
            while self._is_watched(name):
                try:
                    index, body = await self._fetch(name)
                except asyncio.CancelledError:
                    raise
                except UnreadableName as exc:
                    self._on_unreadable(name, exc)
                    return
                except Exception as exc:
                    self._on_error(f"health:{name}", exc)
                    await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                backoff = BACKOFF_START
                try:
                    self._on_health(name, index, body)
                except Exception as exc:  # a bug must not pass silently: the next sweep fetches it again
                    log.exception("health:%s: the answer could not be taken in", printable(name))
                    self._on_error(f"health:{name}", exc)
                if name not in self._again:
                    return
        finally:
            self._fetching.discard(name)

    def _is_watched(self, name: str) -> bool:
        with self._lock:
            return name in (self._tagged or ())

    def _on_health(self, name: str, index: int, body: str) -> None:
        parsed = None
        try:
            parsed = parse_service(name, body)
        except CatalogFormatError as exc:
            self._on_error(f"health:{name}", exc)
        with self._lock:
            if name not in (self._tagged or ()):
                return
            if self._indexes.get(name, index) != index:
                self._moves += 1
                self._moved[name] = self._moves
            self._indexes[name] = index
            if parsed is None:
                return
            self._errors.pop(f"health:{name}", None)
            if self._instances.get(name) == parsed.instances and self._rejected.get(name) == parsed.rejected:
                return
            self._instances[name] = parsed.instances
            self._rejected[name] = parsed.rejected
        self._changed(f"consul: {printable(name)} changed")

    def _on_unreadable(self, name: str, exc: Exception) -> None:
        """A service Consul cannot be asked about is rejected whole, and the rest of the catalog goes on."""
        rejection = Rejection(name, WHOLE_SERVICE, "", f"Consul cannot be asked for this service's health by name "
                                                         f"({exc}); rename it to use it")
        with self._lock:
            if name not in (self._tagged or ()):
                return
            changed = self._rejected.get(name) != (rejection,)
            self._instances[name], self._rejected[name] = (), (rejection,)
            self._unreadable.add(name)
            self._errors.pop(f"health:{name}", None)
        if changed:
            self._changed(f"consul: {printable(name)} cannot be read")

    def _on_error(self, name: str, exc: Exception) -> None:
        message = describe_error(exc)
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
                "connections": {"limit": self.consul_config.max_connections, "in_use": self._in_use,
                                "most": self._peak},
                "sweeps": self.sweeps,
                "cached_sweeps": self.cached_sweeps,
                "reads": self.reads,
                "error_counts": dict(self._error_counts),
                "changes": self.changes,
            }

    def stop(self) -> None:
        stop_loop(self._loop, self._stopped)
