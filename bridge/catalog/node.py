"""The backend role's catalog source: only its own node's tagged instances, so a backend never wakes up
for a change elsewhere in the fleet.

A backend needs nothing but the VIPs its own node's instances claim. Watching the whole catalog, as the
director does, would multiply Consul's blocking queries and the agents' CPU by the number of application
nodes for nothing. Measured on Consul 1.16.3 (docs/consul-watch.md, "The backend's node watch"): a blocking
`/v1/catalog/node-services/<node>` wakes for every registration, deregistration, tag, port and address edit
of that node's services and for the node's address, but not for a check; `/v1/health/node/<node>` wakes for
every check of the node (its own and its services') and for a registration or deregistration with a check,
but not for an edit of a service alone. Neither wakes for anything on another node. No public endpoint wakes
for both kinds (only the UI's internal `/v1/internal/ui/node/<node>` does, with no stability promise), so
the source holds two blocking queries, two connections, and joins their latest answers through the same
msgspec boundary as the director (`parse_node`): the same `Instance` values, so `claims_of_node` and
`backend_pass` work unchanged. The index rules, rate limits, jitter, backoff and fail static are those of
the director's feeds (`consul.Watch`).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from functools import partial
from typing import Any
from urllib.parse import quote

import consul.aio

from bridge.catalog.consul import (
    READ_TIMEOUT,
    Watch,
    blocking_get,
    describe_error,
    error_kind,
    make_async_client,
    run_forever,
    stop_loop,
)
from bridge.catalog.consul_format import CatalogFormatError, parse_node
from bridge.catalog.source import CatalogUnavailable, OnChange
from bridge.core.config import Config
from bridge.core.model import Snapshot
from bridge.core.printable import printable

FEEDS = ("services", "checks")


class UnknownNode(RuntimeError):
    """Consul does not list the configured node: most likely `node_name` is not the node's name in Consul.
    Taken for an empty node, it would remove every VIP of the node's instances, so the source fails static."""


class NodeSource:
    """Watches one node's services and checks with two blocking queries; tells the agent only when the
    node's tagged instances (or their rejections) changed."""

    def __init__(self, config: Config) -> None:
        assert config.consul is not None
        self.consul_config = config.consul
        self.node = config.node_name
        self.vip_tag = f"{config.tag_prefix}.vip"
        self.wait_seconds = self.consul_config.wait_seconds
        where = quote(self.node, safe="")
        self._paths = {"services": f"/v1/catalog/node-services/{where}", "checks": f"/v1/health/node/{where}"}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._bodies: dict[str, str] = {}
        self._snapshot: Snapshot | None = None
        self._errors: dict[str, str] = {}
        self._error_counts: Counter[str] = Counter()
        self._on_change: OnChange = lambda reason: None
        self._stopped = threading.Event()
        self.answers = 0
        """Answers of either query, the first ones and the re-arms after `wait` included: how often the
        source woke up."""
        self.changes = 0

    def start(self, on_change: OnChange) -> None:
        self._on_change = on_change
        threading.Thread(target=self._watch_forever, name="consul-node-watch", daemon=True).start()

    def _watch_forever(self) -> None:
        run_forever(self._loop, self._main, self._stopped, partial(self._on_error, "services"))

    async def _main(self) -> None:
        client = make_async_client(self.consul_config, len(FEEDS))
        watches = [Watch(name, partial(self._get, client, name), partial(self._on_answer, name),
                         self._on_error, self.wait_seconds) for name in FEEDS]
        tasks = [asyncio.create_task(watch.run()) for watch in watches]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()

    def _get(self, client: consul.aio.Consul, name: str, index: int, wait: str) -> Any:
        return blocking_get(client, self._paths[name], index, wait, self.wait_seconds * 1.1 + READ_TIMEOUT)

    def _on_answer(self, name: str, index: int, body: str) -> None:
        """An answer clears its query's error (Consul is back), even when nothing changed meanwhile; a
        format error stays until the node's answers fit again."""
        with self._lock:
            self.answers += 1
            self._errors.pop(name, None)
            if self._bodies.get(name) == body:
                return
            self._bodies[name] = body
            if len(self._bodies) < len(FEEDS):
                return
            services, checks = self._bodies["services"], self._bodies["checks"]
        try:
            parsed = parse_node(services, checks, self.vip_tag)
        except CatalogFormatError as exc:
            self._on_error("format", exc)
            return
        if parsed is None:
            self._on_error("format", UnknownNode(
                f"node {self.node!r} is not in Consul's catalog: set node_name to this node's name in Consul (the "
                "local agent's NodeName in /v1/agent/self); its VIPs are kept meanwhile"))
            return
        with self._lock:
            self._errors.pop("format", None)
            if self._snapshot is not None and (self._snapshot.instances, self._snapshot.rejected) == (
                    parsed.instances, parsed.rejected):
                return
            self._snapshot = parsed
            self.changes += 1
        self._on_change(f"consul: node {printable(self.node)} changed")

    def _on_error(self, name: str, exc: Exception) -> None:
        with self._lock:
            self._error_counts[error_kind(exc)] += 1
            self._errors[name] = describe_error(exc)

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._snapshot is None:
                raise CatalogUnavailable(next(iter(self._errors.values()), f"waiting for node {self.node}'s "
                                                                           "services and checks"))
            return self._snapshot

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {
                "source": "consul node",
                "address": self.consul_config.address,
                "node": self.node,
                "ok": not self._errors,
                "errors": dict(sorted(self._errors.items())),
                "watches": len(FEEDS),
                "connections": {"limit": len(FEEDS)},
                "answers": self.answers,
                "error_counts": dict(self._error_counts),
                "changes": self.changes,
            }

    def stop(self) -> None:
        stop_loop(self._loop, self._stopped)
