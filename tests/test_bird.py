"""BGP and BFD session state from BIRD's control socket, on replies recorded byte for byte from BIRD 2.0.12
(Debian's bird2) on its control socket, served by a stand-in socket that speaks the same protocol.

The BFD replies come from two BIRDs in two network namespaces joined by a veth pair (192.0.2.1, 192.0.2.2):
BGP with `bfd on` to the other BIRD (established, BFD Up), to an absent neighbour on the link (BFD Down)
and, later, multihop to one off the link (BFD Down, no interface), with a second, multihop BFD protocol and
a third one disabled, and `timeformat protocol iso long` (Since in two words). The first `show protocols`
is from the previous recording (one session established, one whose neighbour refuses, one disabled)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bridge.inspect.bird import BfdSession, BirdError, Sessions, bfd_running, bfd_sessions, bgp_sessions, read_sessions
from tests.harness.shadow_agent import Catalog, director, scrape, web

GREETING = b"0001 BIRD 2.0.12 ready.\n"
SHOW_PROTOCOLS = (
    b"2002-Name       Proto      Table      State  Since         Info\n"
    b"1002-device1    Device     ---        up     16:16:28.851  \n"
    b" uplink1    BGP        ---        up     16:16:32.636  Established   \n"
    b" uplink2    BGP        ---        start  16:16:28.851  Active        Socket: Connection refused\n"
    b" rt_x       BGP        ---        down   16:16:28.851  \n"
    b"0000 \n")
"""`show protocols` without BFD, as BIRD 2.0.12 wrote it on its control socket, byte for byte."""
SHOW_PROTOCOLS_BFD = (
    b"2002-Name       Proto      Table      State  Since         Info\n"
    b"1002-device1    Device     ---        up     2026-12-01 17:36:29  \n"
    b" bfd1       BFD        ---        up     2026-12-01 17:36:29  \n"
    b" uplink1    BGP        ---        up     2026-12-01 17:37:46  Established   \n"
    b" uplink2    BGP        ---        start  2026-12-01 17:36:29  Active        Socket: No route to host\n"
    b" bfd_mh     BFD        ---        up     2026-12-01 17:37:06  \n"
    b" bfd_off    BFD        ---        down   2026-12-01 17:37:06  \n"
    b" far1       BGP        ---        start  2026-12-01 17:37:06  Active        Socket: Network is unreachable\n"
    b"0000 \n")
"""`show protocols` with three BFD protocols (one disabled), `timeformat protocol iso long`."""
SHOW_BFD_SESSIONS = (
    b"1020-bfd1:\n"
    b" IP address                Interface  State      Since         Interval  Timeout\n"
    b" 192.0.2.2                 i11va      Down       2026-12-01 17:37:42    1.000    0.000\n"
    b" 192.0.2.3                 i11va      Down       2026-12-01 17:36:29    1.000    0.000\n"
    b" 198.51.100.9              ---        Down       2026-12-01 17:37:06    1.000    0.000\n"
    b" \n"
    b" bfd_mh:\n"
    b" IP address                Interface  State      Since         Interval  Timeout\n"
    b"0000 \n")
"""`show bfd sessions` of the same BIRD at the same time: every running BFD protocol's sessions (the disabled
one is left out). uplink1 is established while its BFD session is Down: bfd_mh took the neighbour's BFD
packets (BIRD logged "bfd_mh: Bad packet from 192.0.2.2 - unknown session id"), so the router would need
the hold time to notice this director fail: what MaglevBfdSessionDown is for."""
SHOW_BFD_UP = (
    b"1020-bfd1:\n"
    b" IP address                Interface  State      Since         Interval  Timeout\n"
    b" 192.0.2.3                 i11va      Down       17:36:29.269    1.000    0.000\n"
    b" 192.0.2.2                 i11va      Up         17:36:51.156    0.100    0.300\n"
    b"0000 \n")
"""Before the second and third BFD protocols: one protocol, the default time format (Since in one word)."""
SHOW_BFD_INIT = (
    b"1020-bfd1:\n"
    b" IP address                Interface  State      Since         Interval  Timeout\n"
    b" 192.0.2.1                 i11vb      Init       17:37:43.313    1.000    3.000\n"
    b"0000 \n")
"""The other BIRD's side of the session bfd_mh broke."""
NO_BFD_PROTOCOL = b"9001 There is no BFD protocol running\n"
"""What BIRD 2.0.12 answers `show bfd sessions` when no BFD protocol runs."""

def test_each_bgp_protocol_is_up_only_when_established():
    assert bgp_sessions(SHOW_PROTOCOLS.decode()) == {"uplink1": True, "uplink2": False, "rt_x": False}


def test_an_error_code_or_a_line_out_of_the_format_is_an_error_not_an_empty_answer():
    with pytest.raises(BirdError, match="BIRD answered 9001: Access denied"):
        bgp_sessions("9001 Access denied\n")
    with pytest.raises(BirdError, match="not a BIRD reply line"):
        bgp_sessions("uplink1 BGP --- up\n")


def test_bfd_sessions_are_asked_for_only_while_a_bfd_protocol_runs():
    assert bfd_running(SHOW_PROTOCOLS_BFD.decode())
    assert not bfd_running(SHOW_PROTOCOLS.decode())
    only_disabled = SHOW_PROTOCOLS_BFD.replace(b"BFD        ---        up", b"BFD        ---        down")
    assert not bfd_running(only_disabled.decode())
    with pytest.raises(BirdError, match="9001: There is no BFD protocol running"):
        bfd_sessions(NO_BFD_PROTOCOL.decode())


def test_each_bfd_session_of_every_protocol_is_up_only_in_state_up_and_a_multihop_one_has_no_interface():
    assert bfd_sessions(SHOW_BFD_SESSIONS.decode()) == {
        BfdSession("bfd1", "192.0.2.2", "i11va"): False,
        BfdSession("bfd1", "192.0.2.3", "i11va"): False,
        BfdSession("bfd1", "198.51.100.9", ""): False,
    }
    assert bfd_sessions(SHOW_BFD_UP.decode()) == {
        BfdSession("bfd1", "192.0.2.3", "i11va"): False,
        BfdSession("bfd1", "192.0.2.2", "i11va"): True,
    }
    assert bfd_sessions(SHOW_BFD_INIT.decode()) == {BfdSession("bfd1", "192.0.2.1", "i11vb"): False}


def test_a_bfd_row_out_of_the_format_is_an_error_not_a_session_left_out():
    unknown_state = SHOW_BFD_INIT.replace(b"Init      ", b"Probing   ")
    with pytest.raises(BirdError, match=r"not a BFD session row: '192\.0\.2\.1 .*Probing"):
        bfd_sessions(unknown_state.decode())
    with pytest.raises(BirdError, match="not a BFD session row"):
        bfd_sessions("1020-192.0.2.2 eth0 Up 17:36:51.156 0.100 0.300\n0000 \n")


class FakeBird:
    """A control socket that greets and answers each command it reads from `replies`, in chunks (or, with
    None, accepts and never answers)."""

    def __init__(self, path: Path, replies: dict[bytes, bytes] | None) -> None:
        self.path, self.replies, self.commands = path, replies, []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            if self.replies is None:
                conn.recv(100)  # accepts and never answers
                conn.recv(100)
                return
            conn.sendall(GREETING)
            while command := conn.recv(100):
                self.commands.append(command)
                reply = self.replies[command]
                for start in range(0, len(reply), 40):
                    conn.sendall(reply[start:start + 40])


@pytest.fixture
def fake_bird(tmp_path: Path) -> Iterator[FakeBird]:
    bird = FakeBird(tmp_path / "bird.ctl", {b"show protocols\n": SHOW_PROTOCOLS_BFD,
                                            b"show bfd sessions\n": SHOW_BFD_SESSIONS})
    yield bird
    bird.server.close()


def test_the_socket_is_greeted_asked_show_protocols_and_bfd_sessions_and_read_to_the_end_of_each_reply(fake_bird):
    assert read_sessions(str(fake_bird.path)) == Sessions(
        {"uplink1": True, "uplink2": False, "far1": False}, bfd_sessions(SHOW_BFD_SESSIONS.decode()))
    assert fake_bird.commands == [b"show protocols\n", b"show bfd sessions\n"]


def test_a_bird_without_bfd_is_asked_show_protocols_only(tmp_path):
    bird = FakeBird(tmp_path / "bird.ctl", {b"show protocols\n": SHOW_PROTOCOLS})
    assert read_sessions(str(bird.path)) == Sessions({"uplink1": True, "uplink2": False, "rt_x": False}, {})
    assert bird.commands == [b"show protocols\n"]
    bird.server.close()


def test_a_bird_that_never_answers_is_an_error_after_the_deadline(tmp_path):
    silent = FakeBird(tmp_path / "bird.ctl", None)
    with pytest.raises(OSError):
        read_sessions(str(silent.path), timeout=0.5)
    silent.server.close()


def test_a_director_exports_each_bgp_and_bfd_session_and_whether_bird_could_be_read(tmp_path, fake_bird):
    agent = director(tmp_path, Catalog([web(1)]))
    assert agent.config.bgp is not None
    agent.config = replace(agent.config, bgp=replace(agent.config.bgp, bird_socket=str(fake_bird.path)))
    metrics = scrape(agent)
    assert metrics["maglev_bridge_bird_read_ok"] == [({}, 1)]
    assert sorted((labels["peer"], v) for labels, v in metrics["maglev_bridge_bgp_session_up"]) == [
        ("far1", 0), ("uplink1", 1), ("uplink2", 0)]
    assert sorted((labels["protocol"], labels["neighbor"], labels["interface"], v)
                  for labels, v in metrics["maglev_bridge_bfd_session_up"]) == [
        ("bfd1", "192.0.2.2", "i11va", 0), ("bfd1", "192.0.2.3", "i11va", 0), ("bfd1", "198.51.100.9", "", 0)]
    gone = scrape(agent)  # the stand-in served its one connection and is gone
    assert gone["maglev_bridge_bird_read_ok"] == [({}, 0)]
    assert "maglev_bridge_bgp_session_up" not in gone, "no session is reported down for an unread BIRD"
    assert "maglev_bridge_bfd_session_up" not in gone
