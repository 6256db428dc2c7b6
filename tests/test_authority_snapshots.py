"""Snapshots off the patch's path: the patch that triggers one returns before its file is
written, later patches go to the next log meanwhile, and recovery is right at every point."""

from __future__ import annotations

import threading

import pytest

from cache_authority import persistence
from cache_authority.engine import Engine
from cache_authority.persistence import SessionStore
from cache_authority.rows import Budget
from cache_authority.sessions import EngineLimits
from cache_authority.snapshot import state_to_snapshot
from tests.authority_fixtures import append_pb, brightness_pb, tiny_geometry

EVERY = 3


def make(tmp_path) -> Engine:
    return Engine(EngineLimits(snapshot_every=EVERY), SessionStore(tmp_path))


def primed(tmp_path) -> Engine:
    engine = make(tmp_path)
    engine.create_session("s", tiny_geometry(), Budget(8, 8), 0.0, lambda s: None)
    engine.patch("s", 0, "p", [append_pb(0, [10, 11, 12], seed=1)])
    return engine


def tick(engine: Engine, v: int) -> int:
    return engine.patch("s", v, f"r{v}", [brightness_pb([float(v)] * 3)]).version


def files(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "sessions" / "s").iterdir())


class HeldWrite:
    """Stands in for write_snapshot: blocks the snapshot thread until released."""

    def __init__(self, monkeypatch, fail: bool = False):
        self.started, self.release = threading.Event(), threading.Event()
        self.fail = fail
        real = persistence.write_snapshot

        def held(folder, snap):
            self.started.set()
            if not self.release.wait(60):
                raise AssertionError("never released")
            if self.fail:
                raise OSError(28, "No space left on device")
            real(folder, snap)

        monkeypatch.setattr(persistence, "write_snapshot", held)


def test_the_patch_that_triggers_a_snapshot_does_not_wait_for_its_write(tmp_path, monkeypatch):
    engine = primed(tmp_path)
    held = HeldWrite(monkeypatch)
    assert tick(engine, 1) == 2
    assert tick(engine, 2) == 3  # v3 is due: the rows are copied, the write is left to a thread
    assert held.started.wait(60)
    assert tick(engine, 3) == 4  # goes to the new log while the snapshot is still being written
    assert files(tmp_path) == [
        "snapshot-000000000000.safetensors", "wal-000000000000.log", "wal-000000000003.log"
    ]  # fmt: skip
    expected = engine.read("s", state_to_snapshot)
    held.release.set()
    engine.wait_for_snapshots()
    assert files(tmp_path) == ["snapshot-000000000003.safetensors", "wal-000000000003.log"]
    engine.close()
    assert make(tmp_path).read("s", state_to_snapshot) == expected


@pytest.mark.parametrize("outcome", ["crash", "fail"])
def test_recovery_is_right_when_a_snapshot_is_never_written(tmp_path, monkeypatch, outcome):
    """A crash before the file is written (or a failed write) leaves the older snapshot and both
    logs: recovery replays the old log up to the switch, then the new one."""
    engine = primed(tmp_path)
    held = HeldWrite(monkeypatch, fail=outcome == "fail")
    for v in range(1, 5):
        tick(engine, v)
    expected = engine.read("s", state_to_snapshot)
    if outcome == "fail":
        held.release.set()
        engine.wait_for_snapshots()
        engine.close()
    # "crash": the engine is abandoned with its write still held, as a killed process leaves it
    assert "snapshot-000000000003.safetensors" not in files(tmp_path)
    monkeypatch.undo()
    recovered = make(tmp_path)
    assert recovered.read("s", state_to_snapshot) == expected
    again = recovered.patch("s", 3, "r3", [brightness_pb([3.0] * 3)])
    assert again.replayed  # request ids in the old log, too
    assert tick(recovered, 5) == 6
    held.fail = True  # the abandoned engine's write never happens
    held.release.set()


def test_deleting_a_session_waits_for_its_snapshot_write(tmp_path, monkeypatch):
    """The write goes into the session's folder, which the deletion moves away: the deletion
    waits. (The held write gives the deletion 2 s to overtake it, which a deletion that does not
    wait would use.)"""
    engine = primed(tmp_path)
    events: list[str] = []
    deleted = threading.Event()
    real_write, real_delete = persistence.write_snapshot, engine.store.delete

    def write(folder, snap):
        events.append("write starts")
        events.append("deletion came first" if deleted.wait(2) else "write ends")
        real_write(folder, snap)

    def delete(session_id):
        events.append("delete")
        deleted.set()
        real_delete(session_id)

    monkeypatch.setattr(persistence, "write_snapshot", write)
    monkeypatch.setattr(engine.store, "delete", delete)
    for v in range(1, 3):
        tick(engine, v)
    engine.delete_session("s")
    assert events == ["write starts", "write ends", "delete"]
    assert not (tmp_path / "sessions" / "s").exists()
    engine.close()
