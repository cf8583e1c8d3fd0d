"""Real BIRD 2 daemons on the host's loopback, for tests that need real BGP and BFD sessions without a
network namespace (tests/harness/router_bed.py runs them in the VM's namespaces instead).

Nothing here touches the host's routing: a configuration has no `kernel` protocol (BIRD writes no route)
and no `device` protocol, and its BGP sessions are `multihop` between loopback addresses, which BIRD
refuses as direct neighbours (127.0.0.0/8 is host scope) but connects as multihop sessions, on ports of
the test's choosing (`local ... port`, `neighbor ... port`). BFD has fixed ports (3784, 4784), so only
one BIRD on the host may run it.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from tests.harness.daemon import Daemon


def bgp_protocol(name: str, local: str, local_port: int, local_as: int, neighbor: str, neighbor_port: int,
                 neighbor_as: int, bfd: bool = False) -> str:
    """One multihop BGP session on loopback that imports and exports nothing."""
    return f"""
protocol bgp {name} {{
    local {local} port {local_port} as {local_as};
    neighbor {neighbor} port {neighbor_port} as {neighbor_as};
    multihop;
    {"bfd on;" if bfd else ""}
    connect retry time 1;
    error wait time 1, 5;
    ipv4 {{ import none; export none; }};
}}
"""


class HostBird(Daemon):
    """`bird -f -c CONF -s SOCK -P PID` on `config` (its log file and router id are added) in a temporary
    folder; `socket` is its control socket."""

    def __init__(self, name: str, router_id: str, config: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"bird-{name}-"))
        self.socket = self.dir / "bird.ctl"
        self.log = self.dir / "bird.log"
        (self.dir / "bird.conf").write_text(f'log "{self.log}" all;\nrouter id {router_id};\n{config}')
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(
            ["bird", "-f", "-c", str(self.dir / "bird.conf"), "-s", str(self.socket), "-P", str(self.dir / "bird.pid")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=(self.dir / "bird.err").open("wb"))
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bird did not start: {(self.dir / 'bird.err').read_text(errors='replace')}")
            time.sleep(0.1)

    def birdc(self, *command: str) -> str:
        return subprocess.run(["birdc", "-s", str(self.socket), *command], capture_output=True, text=True,
                              timeout=30, check=True).stdout
