"""The write-ahead log's durability settings: when a patch's record is fsynced (before the reply,
by the background flusher, or never), what the reply says, and that recovery is right in each."""

from __future__ import annotations

import os
import struct
import time

import pytest

from cache_authority import persistence
from cache_authority.durability import Durability
from cache_authority.engine import Engine
from cache_authority.persistence import CorruptStore, SessionStore
from cache_authority.rows import Budget
from cache_authority.sessions import EngineLimits
from cache_authority.snapshot import state_to_snapshot
from tests.authority_fixtures import append_pb, evict_pb, tiny_geometry

MODES = ["fsync", "batch", "none"]


def make(tmp_path, durability: str, interval_ms: int = 60_000) -> Engine:
    """An engine over tmp_path; the batch flusher's default period here outlasts any test, so
    that its rounds happen only when a test asks (flush_now) or the store closes."""
    return Engine(EngineLimits(), SessionStore(tmp_path, durability, interval_ms))


def tick(engine: Engine, v: int):
    rows = engine.read("s", lambda s: s.live_token_ids())
    ops = [append_pb(len(rows), [v % 40], seed=v)]
    if len(rows) > 4:
        ops.insert(0, evict_pb(1, rows[1]))
    return engine.patch("s", v, f"r{v}", ops)


def primed(tmp_path, durability: str, **kw) -> Engine:
    engine = make(tmp_path, durability, **kw)
    engine.create_session("s", tiny_geometry(), Budget(8, 8), 0.0, lambda s: None)
    engine.patch("s", 0, "p", [append_pb(0, [10, 11, 12], seed=1)])
    return engine


def fsync_spy(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def spy(fd):
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(persistence.os, "fsync", spy)
    return calls


def snapshot_of(engine: Engine):
    return engine.read("s", state_to_snapshot)


def test_fsync_fsyncs_every_patch_before_the_reply(tmp_path, monkeypatch):
    engine = primed(tmp_path, "fsync")
    calls = fsync_spy(monkeypatch)
    results = [tick(engine, v) for v in range(1, 5)]
    assert len(calls) == 4 and all(r.durable for r in results)
    engine.close()


def test_none_never_fsyncs_a_patch_and_still_recovers_every_one(tmp_path, monkeypatch):
    engine = primed(tmp_path, "none")
    calls = fsync_spy(monkeypatch)
    results = [tick(engine, v) for v in range(1, 6)]
    assert calls == [] and not any(r.durable for r in results)
    expected = snapshot_of(engine)
    engine.close()
    assert calls == []  # not on close either
    monkeypatch.undo()
    assert snapshot_of(make(tmp_path, "none")) == expected


def test_batch_leaves_fsync_to_the_flusher_which_syncs_each_written_log_once(tmp_path, monkeypatch):
    engine = primed(tmp_path, "batch")
    store = engine.store
    assert store is not None and store._flusher is not None
    store._flusher.flush_now()  # the prime's record
    calls = fsync_spy(monkeypatch)
    results = [tick(engine, v) for v in range(1, 6)]
    assert calls == [] and not any(r.durable for r in results)
    store._flusher.flush_now()
    assert calls == [store._wal["s"][1].fileno()]  # five patches, one fsync
    store._flusher.flush_now()
    assert len(calls) == 1  # nothing written since
    tick(engine, 6)
    expected = snapshot_of(engine)
    engine.close()  # a last round on the way out
    assert len(calls) >= 2
    monkeypatch.undo()
    assert snapshot_of(make(tmp_path, "batch")) == expected


def test_the_batch_flusher_runs_on_its_own(tmp_path, monkeypatch):
    engine = primed(tmp_path, "batch", interval_ms=5)
    calls = fsync_spy(monkeypatch)
    tick(engine, 1)
    deadline = time.monotonic() + 60
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls  # no test thread asked for it
    engine.close()


def records(wal) -> list[tuple[int, int]]:
    """(start, end) byte range of each record of a log."""
    data, out, offset = wal.read_bytes(), [], 0
    while offset < len(data):
        length, _ = struct.unpack_from("<II", data, offset)
        out.append((offset, offset + 8 + length))
        offset += 8 + length
    return out


@pytest.mark.parametrize("durability", MODES)
def test_damage_inside_the_log_is_refused_under_fsync_and_cut_off_under_the_others(
    tmp_path, durability
):
    """A machine crash in batch or none may leave garbage past the last fsync: recovery keeps
    what precedes it. Under fsync the same damage means the disk lost acknowledged data."""
    engine = primed(tmp_path, durability)
    for v in range(1, 4):
        tick(engine, v)
        if v == 1:
            after_first_tick = snapshot_of(engine)
    engine.close()
    wal = tmp_path / "sessions" / "s" / "wal-000000000000.log"
    spans = records(wal)
    assert len(spans) == 4  # the prime and three ticks
    data = bytearray(wal.read_bytes())
    data[spans[2][0] + 12] ^= 0xFF  # inside the second tick's record; two records follow it
    wal.write_bytes(bytes(data))
    if durability == "fsync":
        with pytest.raises(CorruptStore):
            make(tmp_path, durability)
        return
    recovered = make(tmp_path, durability)
    assert snapshot_of(recovered) == after_first_tick
    assert wal.stat().st_size == spans[2][0]  # cut at the first bad record
    assert tick(recovered, 2).version == 3  # and it goes on from there


def test_durability_names_are_checked():
    assert Durability.parse("batch") is Durability.BATCH
    with pytest.raises(ValueError, match="fsync, batch, none"):
        Durability.parse("eventually")
