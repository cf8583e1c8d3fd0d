"""The echo service of the kernel test bed: a server on each backend that answers every line with the backend's
name, and the client side of one TCP connection to a VIP, so a test sees which backend holds each connection
and whether it is still alive.

The server is python with no extra packages (a python start costs ~1-2 s in the VM: start several at once with
``Topology.serve()``).  TCP: on accept it sends ``<name>\\n``, then answers every line it receives with
``<name>\\n``; UDP: it answers every datagram with ``<name>\\n``. IPv4, or IPv6 when asked (an IPv6 VIP).
"""

from __future__ import annotations

import selectors
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.netns import Netns, kill

SERVER_CODE = r"""
import socket, socketserver, sys
name, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
family = socket.AF_INET6 if sys.argv[4:] == ["6"] else socket.AF_INET
reply = (name + "\n").encode()
class TCP(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(reply)
        for _line in self.rfile:
            self.wfile.write(reply)
class UDP(socketserver.BaseRequestHandler):
    def handle(self):
        self.request[1].sendto(reply, self.client_address)
class TS(socketserver.ThreadingTCPServer):
    address_family = family
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 512
    def handle_error(self, request, client_address):
        pass
class US(socketserver.UDPServer):
    address_family = family
    allow_reuse_address = True
host = "::" if family == socket.AF_INET6 else "0.0.0.0"
srv = TS((host, port), TCP) if proto == "tcp" else US((host, port), UDP)
print("ready", flush=True)
srv.serve_forever()
"""


@dataclass
class Server:
    backend: Netns
    name: str
    port: int
    proto: str
    proc: subprocess.Popen[bytes]
    log: Path

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"echo server {self.name} on {self.backend.name} not ready after {timeout}s; "
                                     f"log: {self.log.read_text(errors='replace')[-2000:]}")
            line = self.proc.stdout.readline()
            if line.strip() == b"ready":
                return
            if not line:
                raise AssertionError(f"echo server {self.name} on {self.backend.name} exited "
                                     f"({self.proc.wait()}): {self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        kill(self.proc)


@dataclass
class Conn:
    """One TCP connection from a client to a VIP."""

    sport: int
    backend: str
    sock: socket.socket = field(repr=False)
    timeout: float = 30.0

    def _line(self) -> str:
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = self.sock.recv(256)
            if not chunk:
                raise ConnectionResetError(f"connection from port {self.sport} closed by the peer")
            buf += chunk
        return buf.decode().strip()

    def ask(self) -> str:
        """Send one line; return the name of the backend that answers (raises if the connection is gone)."""
        self.sock.settimeout(self.timeout)
        self.sock.sendall(b"?\n")
        return self._line()

    def answer(self) -> str:
        """The answer to a line already sent (with sock.sendall, e.g. during a loss episode)."""
        self.sock.settimeout(self.timeout)
        return self._line()

    def alive(self) -> bool:
        try:
            return bool(self.ask())
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


def spread(conns: Iterable[Conn]) -> Counter[str]:
    """How many of the connections each backend holds."""
    return Counter(c.backend for c in conns)
