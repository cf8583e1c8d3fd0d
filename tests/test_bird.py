"""BGP session state from BIRD's control socket, on a reply recorded from BIRD 2.0.12 (two BIRDs peering over
loopback in a network namespace: one session established, one whose neighbour refuses, one disabled), served
by a stand-in socket that speaks the same protocol."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bridge.inspect.bird import BirdError, bgp_sessions, read_bgp_sessions
from tests.test_agent_passes import Catalog, web
from tests.test_announcements import director
from tests.test_metrics import scrape

GREETING = b"0001 BIRD 2.0.12 ready.\n"
SHOW_PROTOCOLS = (
    b"2002-Name       Proto      Table      State  Since         Info\n"
    b"1002-device1    Device     ---        up     16:16:28.851  \n"
    b" uplink1    BGP        ---        up     16:16:32.636  Established   \n"
    b" uplink2    BGP        ---        start  16:16:28.851  Active        Socket: Connection refused\n"
    b" rt_x       BGP        ---        down   16:16:28.851  \n"
    b"0000 \n")
"""`show protocols` as BIRD 2.0.12 wrote it on its control socket, byte for byte."""


def test_each_bgp_protocol_is_up_only_when_established():
    assert bgp_sessions(SHOW_PROTOCOLS.decode()) == {"uplink1": True, "uplink2": False, "rt_x": False}


def test_an_error_code_or_a_line_out_of_the_format_is_an_error_not_an_empty_answer():
    with pytest.raises(BirdError, match="BIRD answered 9001: Access denied"):
        bgp_sessions("9001 Access denied\n")
    with pytest.raises(BirdError, match="not a BIRD reply line"):
        bgp_sessions("uplink1 BGP --- up\n")


class FakeBird:
    """A control socket that greets, reads one command and answers it with `reply` in chunks (or never)."""

    def __init__(self, path: Path, reply: bytes | None) -> None:
        self.path, self.reply, self.commands = path, reply, []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            if self.reply is None:
                conn.recv(100)  # accepts and never answers
                conn.recv(100)
                return
            conn.sendall(GREETING)
            self.commands.append(conn.recv(100))
            for start in range(0, len(self.reply), 40):
                conn.sendall(self.reply[start:start + 40])


@pytest.fixture
def fake_bird(tmp_path: Path) -> Iterator[FakeBird]:
    bird = FakeBird(tmp_path / "bird.ctl", SHOW_PROTOCOLS)
    yield bird
    bird.server.close()


def test_the_socket_is_greeted_asked_show_protocols_and_read_to_the_end_of_the_reply(fake_bird):
    assert read_bgp_sessions(str(fake_bird.path)) == {"uplink1": True, "uplink2": False, "rt_x": False}
    assert fake_bird.commands == [b"show protocols\n"]


def test_a_bird_that_never_answers_is_an_error_after_the_deadline(tmp_path):
    silent = FakeBird(tmp_path / "bird.ctl", None)
    with pytest.raises(OSError):
        read_bgp_sessions(str(silent.path), timeout=0.5)
    silent.server.close()


def test_a_director_exports_each_bgp_session_and_whether_bird_could_be_read(tmp_path, fake_bird):
    agent = director(tmp_path, Catalog([web(1)]))
    assert agent.config.bgp is not None
    agent.config = replace(agent.config, bgp=replace(agent.config.bgp, bird_socket=str(fake_bird.path)))
    metrics = scrape(agent)
    assert metrics["maglev_bridge_bird_read_ok"] == [({}, 1)]
    assert sorted((labels["peer"], v) for labels, v in metrics["maglev_bridge_bgp_session_up"]) == [
        ("rt_x", 0), ("uplink1", 1), ("uplink2", 0)]
    gone = scrape(agent)  # the stand-in served its one connection and is gone
    assert gone["maglev_bridge_bird_read_ok"] == [({}, 0)]
    assert "maglev_bridge_bgp_session_up" not in gone, "no session is reported down for an unread BIRD"
