"""The Consul catalog source: blocking queries on the service list and on the health of each tagged
service, following Consul's documented rules for blocking queries.

* The index is reset to 0 when it goes backwards and never sent below 1; a return is not assumed to be
  a change (the content is compared).
* Each watch is rate-limited by a small token bucket, and `wait` carries jitter.
* Errors never empty the catalog: the last good answer of every watch is kept (fail static) and the
  source reports itself degraded, retrying with capped exponential backoff.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import consul
import requests

from bridge.catalog.consul_format import snapshot_from_services
from bridge.catalog.source import CatalogUnavailable, OnChange
from bridge.config import Config, ConsulConfig
from bridge.model import Snapshot

log = logging.getLogger("maglev-bridge.consul")
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0


class ConsulAccessError(RuntimeError):
    """Consul answered, but refused: an ACL token without the permissions the agent needs."""


def read_token(config: ConsulConfig) -> str | None:
    """From `token_file`, else CONSUL_HTTP_TOKEN. Never logged."""
    if config.token_file:
        return Path(config.token_file).read_text().strip() or None
    return os.environ.get("CONSUL_HTTP_TOKEN") or None


def make_client(config: ConsulConfig) -> consul.Consul:
    scheme, _, rest = config.address.rpartition("://")
    host, _, port = rest.rpartition(":")
    verify: bool | str = config.ca_file or True
    cert = (config.cert_file, config.key_file) if config.cert_file and config.key_file else None
    client = consul.Consul(
        host=host or "127.0.0.1", port=int(port or 8500), scheme=scheme or "http", token=read_token(config),
        dc=config.datacenter, verify=verify, cert=cert, consistency="stale" if config.stale else "default",
    )
    if config.tls_server_name and scheme == "https":
        from requests.adapters import HTTPAdapter

        class ServerNameAdapter(HTTPAdapter):
            def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
                kwargs["server_hostname"] = config.tls_server_name
                kwargs["assert_hostname"] = config.tls_server_name
                super().init_poolmanager(*args, **kwargs)

        client.http.session.mount("https://", ServerNameAdapter())
    return client


def parse_wait(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    for suffix in ("ms", "s", "m"):
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(text[: -len(suffix)]) * units[suffix]
    raise ValueError(f"consul.wait: {text!r} is not a duration like 30s")


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


def blocking_get(client: consul.Consul, path: str, index: int, wait: str) -> tuple[int, Any]:
    """One blocking query, checking what py-consul's callbacks do not expose: a 403, or an answer that
    ACLs filtered, must not look like services having gone away."""
    params: list[tuple[str, Any]] = []
    if client.dc:
        params.append(("dc", client.dc))
    if index:
        params += [("index", index), ("wait", wait)]
    if client.consistency == "stale":
        params.append(("stale", "1"))

    def parse(response: Any) -> tuple[int, Any]:
        if response.code == 403:
            raise ConsulAccessError(f"{path}: 403 {str(response.body).strip()}")
        if response.code >= 400:
            raise ConsulAnswerError(f"{path}: {response.code} {str(response.body).strip()[:200]}")
        if str(response.headers.get("X-Consul-Results-Filtered-By-ACLs", "")).lower() == "true":
            raise ConsulAccessError(f"{path}: results were filtered by ACLs")
        return int(response.headers.get("X-Consul-Index", 0)), json.loads(response.body)

    result: tuple[int, Any] = client.http.get(parse, path, params=params, headers=client.prepare_headers())
    return result


def _describe_error(exc: Exception) -> str:
    if isinstance(exc, ConsulAccessError):
        return (f"Consul ACL: the token must be able to read every service and node (service_prefix \"\" and "
                f"node_prefix \"\" read): {exc}")
    if isinstance(exc, requests.ConnectionError):
        return f"Consul unreachable: {exc.__class__.__name__}"
    return f"{exc.__class__.__name__}: {exc}"


class Watch:
    """One blocking query in its own thread, calling `fetch(index, wait)` until stopped."""

    def __init__(self, name: str, fetch: Callable[[int, str], tuple[Any, Any]], on_result: Callable[[Any], None],
                 on_error: Callable[[str, Exception], None], wait: str, stop: threading.Event) -> None:
        self.name = name
        self.fetch = fetch
        self.on_result = on_result
        self.on_error = on_error
        self.wait_seconds = parse_wait(wait)
        self.stop = stop
        self.halt = threading.Event()
        self.index = 0
        self.bucket = TokenBucket()
        self.thread = threading.Thread(target=self._loop, name=f"watch:{name}", daemon=True)

    def _stopped(self) -> bool:
        return self.stop.is_set() or self.halt.is_set()

    def _loop(self) -> None:
        backoff = BACKOFF_START
        while not self._stopped():
            pause = self.bucket.delay()
            if pause and (self.stop.wait(pause) or self.halt.is_set()):
                return
            wait = f"{self.wait_seconds * random.uniform(0.9, 1.0):.3f}s"
            try:
                index, data = self.fetch(self.index, wait)
            except Exception as exc:
                self.on_error(self.name, exc)
                if self.stop.wait(backoff * random.uniform(0.5, 1.0)):
                    return
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_START
            if self._stopped():
                return
            self.index = next_index(self.index, int(index or 0))
            self.on_result(data)


class ConsulSource:
    """Watches the service list for tagged services and the health of each of them."""

    def __init__(self, config: Config, client_factory: Callable[[], consul.Consul] | None = None) -> None:
        assert config.consul is not None
        self.consul_config = config.consul
        self.vip_tag = f"{config.tag_prefix}.vip"
        self._client_factory = client_factory or (lambda: make_client(self.consul_config))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._tagged: set[str] | None = None
        self._entries: dict[str, list[dict[str, Any]]] = {}
        self._watches: dict[str, Watch] = {}
        self._errors: dict[str, str] = {}
        self._on_change: OnChange = lambda reason: None
        self.changes = 0

    # ---- watches ---------------------------------------------------------------------------------

    def start(self, on_change: OnChange) -> None:
        self._on_change = on_change
        client = self._client_factory()
        watch = Watch("services", lambda index, wait: blocking_get(client, "/v1/catalog/services", index, wait),
                      self._on_services, self._on_error, self.consul_config.wait, self._stop)
        watch.thread.start()

    def _is_tagged(self, tags: list[str]) -> bool:
        return any(t == self.vip_tag or t.startswith(self.vip_tag + "=") for t in tags or ())

    def _on_services(self, services: dict[str, list[str]]) -> None:
        tagged = {name for name, tags in services.items() if self._is_tagged(tags)}
        with self._lock:
            first = self._tagged is None
            self._errors.pop("services", None)
            added = tagged - set(self._watches)
            removed = set(self._watches) - tagged
            self._tagged = tagged
            for name in removed:
                self._watches.pop(name).halt.set()
                self._entries.pop(name, None)
                self._errors.pop(f"health:{name}", None)
            for name in sorted(added):
                self._watches[name] = self._service_watch(name)
                self._watches[name].thread.start()
        if removed:
            self._changed(f"consul: services no longer tagged: {', '.join(sorted(removed))}")
        elif first and not tagged:
            self._changed("consul: no tagged services")

    def _service_watch(self, name: str) -> Watch:
        client = self._client_factory()

        def fetch(index: int, wait: str) -> tuple[Any, Any]:
            return blocking_get(client, f"/v1/health/service/{name}", index, wait)

        def on_result(entries: list[dict[str, Any]]) -> None:
            with self._lock:
                self._errors.pop(f"health:{name}", None)
                if name not in self._watches:
                    return
                if self._entries.get(name) == entries:
                    return
                self._entries[name] = entries
            self._changed(f"consul: {name} changed")

        return Watch(f"health:{name}", fetch, on_result, self._on_error, self.consul_config.wait, self._stop)

    def _on_error(self, name: str, exc: Exception) -> None:
        message = _describe_error(exc)
        with self._lock:
            first = self._errors.get(name) != message
            self._errors[name] = message
        if first:
            level = logging.WARNING if name == "services" else logging.DEBUG
            log.log(level, "%s: %s (keeping the last good data, retrying)", name, message)

    def _changed(self, reason: str) -> None:
        self.changes += 1
        self._on_change(reason)

    # ---- snapshot --------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._tagged is None:
                raise CatalogUnavailable(self._errors.get("services", "waiting for the first service list"))
            missing = sorted(self._tagged - set(self._entries))
            if missing:
                reason = self._errors.get(f"health:{missing[0]}", "waiting for the first answer")
                raise CatalogUnavailable(f"no health data yet for {len(missing)} service(s) ({missing[0]}: {reason})")
            entries = {name: self._entries[name] for name in sorted(self._tagged)}
        return snapshot_from_services(entries)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "source": "consul",
                "address": self.consul_config.address,
                "ok": not self._errors,
                "errors": dict(sorted(self._errors.items())[:20]),
                "tagged_services": len(self._tagged or ()),
                "changes": self.changes,
            }

    def stop(self) -> None:
        self._stop.set()
