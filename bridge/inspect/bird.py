"""The director's BGP and BFD sessions as its BIRD sees them: `show protocols` and `show bfd sessions` on
BIRD's control socket.

Why not the field's library: pybird 1.2.0 (PyPI) answers correctly against BIRD 2.0.12 (tried on two
BIRDs peering in a namespace), but its socket has no timeout, and /metrics reads BIRD under the scrape's
lock, so a BIRD that accepts and never answers would hang every later scrape; it also reads `show
protocols all` (every channel's counters) for one bit per session. Why not `birdc`: a process per scrape
and a table meant for people. The socket (what birdc talks to) answers in BIRD's numbered reply format
(doc/reply_codes): every line starts with a 4-digit code and `-` (more follows) or ` ` (the reply's last
line), or with a space (one more line of the previous code); 0000 ends a successful reply, 8xxx/9xxx are
errors, 1002 lines are `show protocols` rows, 1020 lines `show bfd sessions`. The parsing is pure functions
over recorded replies (tests/test_bird.py); the socket is a small shell around them with a deadline.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import NamedTuple

PROTOCOL_ROW = 1002
"""`show protocols`: Name, Proto, Table, State, Since (one or two words), Info."""
BFD_SESSIONS = 1020
"""`show bfd sessions`: per running BFD protocol a `name:` line, a heading, then one row per session:
IP address, Interface (`---` for a multihop session), State, Since (one or two words, as `timeformat
protocol` says), Interval, Timeout; a blank line between protocols."""
BFD_STATES = ("AdminDown", "Down", "Init", "Up")
"""RFC 5880's session states, as BIRD names them (bfd.c, bfd_state_names)."""
STOPPED = ("down", "flush")
"""`show protocols` states of a protocol that is not running (BIRD's PS_DOWN)."""


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


class BfdSession(NamedTuple):
    """One BFD session: the BIRD protocol that runs it, the neighbour's address, and the interface (empty
    for a multihop session)."""

    protocol: str
    neighbor: str
    interface: str


@dataclass(frozen=True)
class Sessions:
    """What BIRD's sessions are now: each BGP protocol's and each BFD session's, True when up."""

    bgp: dict[str, bool]
    bfd: dict[BfdSession, bool]


def bfd_running(reply: str) -> bool:
    """Whether `show protocols` lists a running BFD protocol: without one, `show bfd sessions` is an error
    (9001 "There is no BFD protocol running"), not an empty answer."""
    for code, text in reply_lines(reply):
        words = text.split()
        if code == PROTOCOL_ROW and len(words) >= 4 and words[1] == "BFD" and words[3] not in STOPPED:
            return True
    return False


def bfd_sessions(reply: str) -> dict[BfdSession, bool]:
    """Each BFD session of `show bfd sessions` -> whether it is Up. A row that is not a session (unknown
    state, too few columns, before any protocol's name) is an error rather than a session left out: a
    session missing from /metrics is one no alert can fire for."""
    sessions: dict[BfdSession, bool] = {}
    protocol = None
    for code, text in reply_lines(reply):
        words = text.split()
        if code != BFD_SESSIONS or not words or words[:2] == ["IP", "address"]:
            continue
        if len(words) == 1 and words[0].endswith(":"):
            protocol = words[0][:-1]
        elif protocol is not None and len(words) >= 6 and words[2] in BFD_STATES:
            interface = "" if words[1] == "---" else words[1]
            sessions[BfdSession(protocol, words[0], interface)] = words[2] == "Up"
        else:
            raise BirdError(f"not a BFD session row: {text.strip()[:80]!r}")
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


def _ask(sock: socket.socket, command: bytes) -> str:
    sock.sendall(command + b"\n")
    return _reply(sock)


def read_sessions(path: str, timeout: float = 2.0) -> Sessions:
    """Ask the BIRD at `path` (OSError when it is not there or silent for `timeout`, BirdError when it
    answers wrong): `show protocols`, then `show bfd sessions` when a BFD protocol runs (one stopped between
    the two makes that one read an error, which the next scrape does not repeat)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        reply_lines(_reply(sock))  # the greeting, `0001 BIRD 2.0.12 ready.`
        protocols = _ask(sock, b"show protocols")
        bfd = bfd_sessions(_ask(sock, b"show bfd sessions")) if bfd_running(protocols) else {}
        return Sessions(bgp_sessions(protocols), bfd)
