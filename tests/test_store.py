"""The state file: validated on load, moved aside when bad, written durably (like the maintenance file),
locked by one agent."""

from __future__ import annotations

import json
import os

import pytest

from bridge.core.keys import DestKey, ServiceKey
from bridge.core.memory import Memory
from bridge.files.maintenance import Maintenance, write_maintenance
from bridge.files.store import StateLock, StateLocked, Stored, load_state, recover_state, save_state

DEST = DestKey(ServiceKey("198.51.100.1", 80, "tcp"), "203.0.113.1", 80)
MEMORY = Memory(drain_deadlines={DEST: 1700000000.5, ServiceKey("198.51.100.2", 53, "udp"): 1700000001.0},
                last_weights={DEST: 3})
WEIGHTS_TEXT = {"198.51.100.1:80/tcp>203.0.113.1:80": 3}
"""MEMORY's last weights as the file holds them: the keys' text forms (the file's format did not change)."""


def test_a_saved_state_reads_back_the_same(tmp_path):
    path = tmp_path / "state.json"
    save_state(path, Stored(MEMORY, {"operations": ["x"]}))
    stored, warning = recover_state(path)
    assert warning is None and stored.memory == MEMORY and stored.report == {"operations": ["x"]}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"], "no temporary file is left behind"


def test_no_state_file_is_an_empty_memory_without_a_warning(tmp_path):
    assert recover_state(tmp_path / "state.json") == (Stored(), None)


@pytest.mark.parametrize(
    ("content", "lost"),
    [
        ('{"drain_deadlines": {"a": 1, "b": 2}, "last_weights": {"a": "heavy"}}',
         "Lost: 2 drain deadlines, 1 last weights"),
        ('[1, 2, 3]', "Lost: a JSON list, not the expected object"),
        ('{"drain_deadlines": {"a": 1', "Lost: whatever it held (it cannot be decoded)"),
        ('{"last_weights": {"a": 70000}}', "Lost: 1 last weights"),
        ("", "is empty (0 bytes)"),
    ],
)
def test_a_bad_state_file_is_moved_aside_with_a_warning_saying_what_was_lost(tmp_path, content, lost):
    path = tmp_path / "state.json"
    path.write_text(content)
    stored, warning = recover_state(path)
    assert stored == Stored()
    assert warning is not None and lost in warning and "starts without memory" in warning
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("state.json.bad-")]
    assert len(aside) == 1 and aside[0].read_text() == content and f"moved to {aside[0]}" in warning
    assert not path.exists()


@pytest.mark.parametrize("key", ["198.51.100.1:80/tcp 203.0.113.1:80", "198.51.100.1:80>203.0.113.1:80",
                                 "198.51.100.1:80/tcp>203.0.113.1"])
def test_a_state_file_with_a_key_the_agent_does_not_write_is_moved_aside_naming_it(tmp_path, key):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"drain_deadlines": {}, "last_weights": {key: 3}}))
    stored, warning = recover_state(path)
    assert stored == Stored()
    assert warning is not None and repr(key) in warning and "expected" in warning
    assert "Lost: 0 drain deadlines, 1 last weights" in warning


def test_a_directory_in_place_of_the_state_file_is_moved_aside_and_saving_works_again(tmp_path):
    path = tmp_path / "state.json"
    path.mkdir()
    stored, warning = recover_state(path)
    assert stored == Stored() and warning is not None and "cannot read it" in warning
    save_state(path, Stored(MEMORY))
    assert json.loads(path.read_text())["last_weights"] == WEIGHTS_TEXT


def test_readers_that_change_nothing_see_a_bad_file_as_empty_and_leave_it(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("[]")
    assert load_state(path) == Stored()
    assert path.read_text() == "[]"


WRITERS = {
    "state": lambda path: save_state(path, Stored(MEMORY)),
    "maintenance": lambda path: write_maintenance(path, Maintenance("kernel upgrade", 1.0, "ops@lb1")),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_the_agents_files_are_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch, writer):
    """The maintenance file too: maintenance is often for a reboot, and a crash right after `maintenance on`
    must not bring the director back into rotation."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    WRITERS[writer](tmp_path / "file")
    assert events == ["fsync file", "rename", "fsync dir"]


def test_a_failed_save_raises_and_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    save_state(path, Stored(MEMORY))
    before = path.read_bytes()

    def full(src, dst) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space left"):
        save_state(path, Stored())
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_second_holder_of_the_lock_is_refused_with_the_first_ones_pid(tmp_path):
    path = tmp_path / "state.json"
    with StateLock(path) as first:
        assert first.note is None
        with pytest.raises(StateLocked, match=rf"in use by another maglev-bridge agent \(pid {os.getpid()}, lock"):
            StateLock(path).acquire()
    with StateLock(path):
        pass
