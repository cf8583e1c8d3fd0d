"""The director's BGP sessions as its BIRD sees them: `show protocols` on BIRD's control socket.

Why not the field's library: pybird 1.2.0 (PyPI) answers correctly against BIRD 2.0.12 (tried on two
BIRDs peering in a namespace), but its socket has no timeout, and /metrics reads BIRD under the scrape's
lock, so a BIRD that accepts and never answers would hang every later scrape; it also reads `show
protocols all` (every channel's counters) for one bit per session. Why not `birdc`: a process per scrape
and a table meant for people. The socket (what birdc talks to) answers in BIRD's numbered reply format
(doc/reply_codes): every line starts with a 4-digit code and `-` (more follows) or ` ` (the reply's last
line), or with a space (one more line of the previous code); 0000 ends a successful reply, 8xxx/9xxx are
errors, 1002 lines are `show protocols` rows. The parsing is a pure function over a recorded reply
(tests/test_bird.py); the socket is a small shell around it with a deadline.
"""

from __future__ import annotations

import socket

PROTOCOL_ROW = 1002
"""`show protocols`: Name, Proto, Table, State, Since (one or two words), Info."""


class BirdError(RuntimeError):
    """BIRD answered with an error code, or not in its reply format."""


def reply_lines(reply: str) -> list[tuple[int, str]]:
    """(code, text) per line of one reply; a continuation line (leading space) carries the previous code."""
    lines: list[tuple[int, str]] = []
    code = 0
    for line in reply.splitlines():
        if line[:4].isdigit() and line[4:5] in ("-", " "):
            code, text = int(line[:4]), line[5:]
        elif line.startswith(" ") and lines:
            text = line[1:]
        else:
            raise BirdError(f"not a BIRD reply line: {line[:80]!r}")
        if code >= 8000:
            raise BirdError(f"BIRD answered {code}: {text.strip()}")
        lines.append((code, text))
    return lines


def bgp_sessions(reply: str) -> dict[str, bool]:
    """BGP protocol name -> whether its session is up (state `up`: BIRD's BGP is up only when Established)."""
    sessions: dict[str, bool] = {}
    for code, text in reply_lines(reply):
        words = text.split()
        if code == PROTOCOL_ROW and len(words) >= 4 and words[1] == "BGP":
            sessions[words[0]] = words[3] == "up"
    return sessions


def _complete(data: bytes) -> bool:
    """A reply is complete at its last line: a code followed by a space."""
    return any(line[:4].isdigit() and line[4:5] == b" " for line in data.split(b"\n")[:-1])


def _reply(sock: socket.socket) -> str:
    data = b""
    while not _complete(data):
        chunk = sock.recv(65536)
        if not chunk:
            raise BirdError("BIRD closed its control socket mid-reply")
        data += chunk
    return data.decode(errors="replace")


def read_bgp_sessions(path: str, timeout: float = 2.0) -> dict[str, bool]:
    """Ask the BIRD at `path` (OSError when it is not there, BirdError when it answers wrong)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        reply_lines(_reply(sock))  # the greeting, `0001 BIRD 2.0.12 ready.`
        sock.sendall(b"show protocols\n")
        return bgp_sessions(_reply(sock))
