"""The agent's small HTTP endpoint: /health for Consul's check (ready only after the first complete
pass, 503 otherwise; 429 while the director is in maintenance, which Consul shows as a warning whether the
agent registered itself or Nomad registered it) and /status, the same data as
`maglev-bridge status --format json` plus the agent's own state."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridge.agent import Agent

log = logging.getLogger("maglev-bridge.http")


def parse_bind(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _status(agent: Agent) -> dict[str, Any]:
    from bridge.status import read_status

    data = read_status(agent.config)
    data["agent"] = agent.state()
    return data


def serve(agent: Agent) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/health":
                state = agent.state()
                code = 503 if not state["ready"] else 429 if state["maintenance"]["on"] else 200
                self._send(code, state)
            elif path == "/status":
                self._send(200, _status(agent))
            else:
                self._send(404, {"error": f"no such endpoint {path}; try /health or /status"})

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body, indent=1).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug(format, *args)

    server = ThreadingHTTPServer(parse_bind(agent.config.http_bind), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
