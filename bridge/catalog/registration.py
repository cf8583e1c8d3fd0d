"""The agent in Consul: registered as a service (role and rack as tags) with an HTTP check on its
/health, so operators and `status --discover` find every director through Consul DNS, and Prometheus'
consul_sd_configs finds every agent to scrape: the tag `metrics` and the meta `metrics_path` are what
examples/prometheus.yml's relabel rules select.

Registration runs beside the data plane, never in its way: it retries with backoff while Consul is
away and re-registers when a restarted Consul agent has forgotten it.
"""

from __future__ import annotations

import logging
import threading

import consul

from bridge import version
from bridge.catalog.consul import make_client
from bridge.clients import summarize_body
from bridge.core.config import Config

log = logging.getLogger("maglev-bridge.announce")
CHECK_EVERY = 15.0
METRICS_TAG = "metrics"
METRICS_PATH = "/metrics"


def service_id(config: Config) -> str:
    assert config.consul is not None
    return f"{config.consul.service_name}-{config.node_name}-{config.role}"


def tags(config: Config) -> list[str]:
    found = [f"role={config.role}", f"dataplane={config.dataplane}", METRICS_TAG]
    if config.rack:
        found.append(f"rack={config.rack}")
    return found


class Announcer:
    def __init__(self, config: Config) -> None:
        assert config.consul is not None
        self.config = config
        self._client: consul.Consul | None = None
        self._stop = threading.Event()
        self.registered = False
        self.error: str | None = None

    @property
    def client(self) -> consul.Consul:
        """Built at first use, inside the retrying loop: a token file that went away after the configuration
        was checked is an error to retry, not a crash at start."""
        if self._client is None:
            assert self.config.consul is not None
            self._client = make_client(self.config.consul)
        return self._client

    def register(self) -> None:
        assert self.config.consul is not None
        address = self.config.http_address
        self.client.agent.service.register(
            self.config.consul.service_name,
            service_id=service_id(self.config),
            address=address.host,
            port=address.port,
            tags=tags(self.config),
            meta={"node": self.config.node_name, "role": self.config.role, "metrics_path": METRICS_PATH,
                  "version": version()},
            check=consul.Check.http(f"http://{address.netloc}/health", interval="5s", timeout="2s",
                                    deregister="10m"),
        )

    def _is_registered(self) -> bool:
        return service_id(self.config) in self.client.agent.services()

    def _loop(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            try:
                if not self._is_registered():
                    self.register()
                    log.info("registered as %s in Consul", service_id(self.config))
                self.registered = True
                self.error = None
                wait = CHECK_EVERY
            except Exception as exc:
                self.registered = False
                self.error = f"{exc.__class__.__name__}: {summarize_body(exc)}"
                wait = min(max(wait * 2, 1.0), CHECK_EVERY)

    def start(self) -> None:
        threading.Thread(target=self._loop, name="announce", daemon=True).start()

    def stop(self) -> None:
        """Clean shutdown: deregister, so DNS stops offering this director at once."""
        self._stop.set()
        try:
            self.client.agent.service.deregister(service_id(self.config))
            log.info("deregistered %s from Consul", service_id(self.config))
        except Exception as exc:
            log.warning("could not deregister from Consul: %s", summarize_body(exc))
