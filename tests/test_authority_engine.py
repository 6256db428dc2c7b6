"""The engine without gRPC: a fault at every stage of a patch changes nothing (in memory or on
disk), retries are idempotent, and the write-ahead log plus snapshots recover every commit."""

from __future__ import annotations

import collections
import contextlib
import os
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_authority import engine as engine_mod
from cache_authority import ops as ops_mod
from cache_authority import persistence, slots, stage, validate
from cache_authority import state as state_mod
from cache_authority.engine import Engine
from cache_authority.ops import PatchError, Status, chain_digest
from cache_authority.persistence import CorruptStore, SessionStore
from cache_authority.rows import Budget
from cache_authority.sessions import EngineLimits
from cache_authority.snapshot import state_from_snapshot, state_to_snapshot
from cache_authority.sync import SyncError, SyncReceiver, delta_messages, snapshot_messages
from positronic.v1 import session_pb2, tensor_pb2
from tests.authority_fixtures import (
    Reference,
    append_pb,
    assert_same_state,
    brightness_pb,
    evict_pb,
    kv_pb,
    replace_pb,
    tiny_geometry,
)


def make_engine(data_dir=None, **limits) -> Engine:
    store = SessionStore(data_dir) if data_dir is not None else None
    return Engine(EngineLimits(**limits), store)


def p1_ops() -> list:
    """The ops prime() sends as request "p1" (a retry must send them again to be replayed)."""
    return [evict_pb(2, 12), append_pb(6, [30], seed=2)]


def prime(engine: Engine, sid: str = "s", n: int = 6) -> None:
    engine.create_session(sid, tiny_geometry(), Budget(16, 16), None, lambda s: None)
    engine.patch(sid, 0, "p0", [append_pb(0, list(range(10, 10 + n)), seed=1)])
    engine.patch(sid, 1, "p1", [evict_pb(2, 12), append_pb(n, [30], seed=2)])


def a_patch():
    """One patch with every kind of op; against prime()'s rows [10, 11, 13, 14, 15, 30]."""
    return [
        brightness_pb([5.0, 4, 3, 2, 1, 0]),
        replace_pb(0, [10, 11], 40, seed=3),
        evict_pb(3, 14),
        append_pb(6, [41, 42], seed=4),
    ]


@contextlib.contextmanager
def _held_by_another_thread(lock):
    """`lock` held by another thread for the duration of the block."""
    held, done = threading.Event(), threading.Event()

    def hold():
        with lock:
            held.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        yield
    finally:
        done.set()
        holder.join()


def snapshot_of(engine: Engine, sid: str = "s"):
    return engine.read(sid, state_to_snapshot)


def raise_on_call(n: int, real, error: Exception | None = None):
    """A stand-in for `real` that raises on its n-th call: a fault midway through a stage."""
    calls = [0]

    def fake(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise error or RuntimeError("injected fault")
        return real(*args, **kwargs)

    return fake


FAULTS = [
    # (stage, module, attribute, which call raises)
    ("decode", engine_mod, "ops_from_pb", 1),
    ("validate, second expected-token check", validate, "_check_expected", 2),
    ("validate, kv of the append", validate, "_check_kv", 2),
    ("stage, the merged row", stage, "_merged_row", 1),
    ("commit, second slot move", slots, "move_slots", 2),
    ("commit, the appended rows", slots, "write_rows", 2),
    ("digest", engine_mod, "chain_digest", 1),
    ("commit, after every row was written", stage, "check_blades", 1),
]


@pytest.mark.parametrize("where,module,name,call", FAULTS, ids=[f[0] for f in FAULTS])
def test_a_fault_at_any_stage_changes_nothing(tmp_path, monkeypatch, where, module, name, call):
    engine = make_engine(tmp_path)
    prime(engine)
    before = snapshot_of(engine)
    wal = engine.store.root / "s" / "wal-000000000000.log"
    wal_bytes = wal.stat().st_size
    monkeypatch.setattr(module, name, raise_on_call(call, getattr(module, name)))
    with pytest.raises(RuntimeError, match="injected"):
        engine.patch("s", 2, "x", a_patch())
    assert snapshot_of(engine) == before  # rows, mirror, version and digest
    assert wal.stat().st_size == wal_bytes  # and nothing of it on disk
    monkeypatch.undo()
    # Nothing stayed locked or half-done: the same patch now commits, and survives a restart.
    assert engine.patch("s", 2, "x", a_patch()).version == 3
    engine.close()
    recovered = make_engine(tmp_path)
    assert_same_state(recovered._sessions["s"].state, make_state_copy(before, a_patch()))


def make_state_copy(snapshot, ops):
    """The snapshot's state with `ops` applied as the next version (what the authority holds)."""
    ref = Reference("s", 16)
    ref.state = state_from_snapshot(*snapshot)
    ref.apply(ops)
    return ref.state


@pytest.mark.parametrize("fail_on", ["write", "fsync"])
def test_a_failed_log_write_is_unavailable_and_leaves_no_record(tmp_path, monkeypatch, fail_on):
    engine = make_engine(tmp_path)
    prime(engine)
    before = snapshot_of(engine)
    session_wal = engine.store._wal["s"][1]
    wal_bytes = session_wal.tell()
    if fail_on == "write":
        real_write = session_wal.write

        def half_write(data):  # the disk fills up halfway through the record
            real_write(data[: len(data) // 2])
            session_wal.flush()
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(session_wal, "write", half_write)
    else:
        monkeypatch.setattr(persistence.os, "fsync", raise_on_call(1, os.fsync, OSError(5, "EIO")))
    with pytest.raises(PatchError) as err:
        engine.patch("s", 2, "x", a_patch())
    assert err.value.status is Status.UNAVAILABLE
    assert snapshot_of(engine) == before
    assert os.path.getsize(session_wal.name) == wal_bytes
    monkeypatch.undo()
    engine.patch("s", 2, "x", a_patch())
    engine.close()
    assert_same_state(
        make_engine(tmp_path)._sessions["s"].state, make_state_copy(before, a_patch())
    )


def test_a_log_that_cannot_be_repaired_breaks_the_session_until_restart(tmp_path, monkeypatch):
    engine = make_engine(tmp_path)
    prime(engine)
    before = snapshot_of(engine)
    session_wal = engine.store._wal["s"][1]
    real_write = session_wal.write

    def half_write(data):  # the disk fills up halfway through the record ...
        real_write(data[: len(data) // 2])
        session_wal.flush()
        raise OSError(28, "No space left on device")

    def no_truncate(*args):  # ... and the truncate that should undo it fails too
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(session_wal, "write", half_write)
    monkeypatch.setattr(session_wal, "truncate", no_truncate)
    with pytest.raises(PatchError) as err:
        engine.patch("s", 2, "x", a_patch())
    assert err.value.status is Status.UNAVAILABLE
    monkeypatch.undo()
    # The disk works again, but half a record sits at the end of the log: nothing may follow it.
    with pytest.raises(PatchError) as err:
        engine.patch("s", 2, "y", a_patch())
    assert err.value.status is Status.UNAVAILABLE and "until the authority restarts" in str(err)
    assert snapshot_of(engine) == before  # reads are still served
    assert engine.patch("s", 1, "p1", p1_ops()).replayed  # and so are stored replies
    engine.close()
    recovered = make_engine(tmp_path)  # the torn record is cut off; the session takes patches
    assert snapshot_of(recovered) == before
    assert recovered.patch("s", 2, "y", a_patch()).version == 3


def test_stale_version_is_aborted_with_the_current_version():
    engine = make_engine()
    prime(engine)
    with pytest.raises(PatchError) as err:
        engine.patch("s", 1, "late", a_patch())
    assert (err.value.status, err.value.current_version) == (Status.ABORTED, 2)


def test_a_retried_request_id_gets_the_first_reply_and_applies_once():
    engine = make_engine()
    prime(engine)
    first = engine.patch("s", 2, "once", a_patch())
    again = engine.patch("s", 2, "once", a_patch())
    assert again.replayed and not first.replayed
    assert (again.version, again.digest, again.row_count) == (3, first.digest, first.row_count)
    assert engine.read("s", lambda s: s.version) == 3


def test_unknown_session_is_not_found():
    with pytest.raises(PatchError) as err:
        make_engine().patch("nope", 0, "", a_patch())
    assert err.value.status is Status.NOT_FOUND


def test_restart_recovers_snapshot_plus_log_and_request_ids(tmp_path):
    engine = make_engine(tmp_path, snapshot_every=3)
    prime(engine)
    sent = {}
    for v in range(2, 8):  # snapshots at v3 and v6, log records v7 and v8
        rows = engine.read("s", lambda s: s.live_token_ids())
        sent[v] = [evict_pb(0, rows[0]), append_pb(len(rows), [v], v)]
        engine.patch("s", v, f"r{v}", sent[v])
    expected = snapshot_of(engine)
    engine.close()
    files = sorted(p.name for p in (tmp_path / "sessions" / "s").iterdir())
    assert files == ["snapshot-000000000006.safetensors", "wal-000000000006.log"]
    recovered = make_engine(tmp_path, snapshot_every=3)
    assert snapshot_of(recovered) == expected
    assert recovered.patch("s", 7, "r7", sent[7]).replayed  # the reply to v8 came from the log


def test_a_retry_after_restart_gets_the_reply_of_a_patch_inside_the_snapshot(tmp_path):
    engine = make_engine(tmp_path, snapshot_every=2)
    prime(engine)  # p0 -> v1, p1 -> v2, and v2 triggers a snapshot: the log after it is empty
    p0_ops = [append_pb(0, list(range(10, 16)), seed=1)]
    first = {  # the stored replies
        "p0": engine.patch("s", 0, "p0", p0_ops),
        "p1": engine.patch("s", 1, "p1", p1_ops()),
    }
    expected = snapshot_of(engine)
    engine.close()
    assert (tmp_path / "sessions" / "s" / "wal-000000000002.log").stat().st_size == 0
    recovered = make_engine(tmp_path, snapshot_every=2)
    again = recovered.patch("s", 1, "p1", [evict_pb(2, 12), append_pb(6, [30], seed=2)])
    assert again.replayed and (again.version, again.digest, again.row_count) == (
        2, first["p1"].digest, first["p1"].row_count)  # fmt: skip
    older = recovered.patch("s", 0, "p0", p0_ops)  # an earlier patch, still within the window
    assert older.replayed and (older.version, older.digest) == (1, first["p0"].digest)
    assert snapshot_of(recovered) == expected  # applied once, version unchanged


def test_the_replies_kept_with_a_snapshot_are_bounded_by_the_window(tmp_path):
    engine = make_engine(tmp_path, snapshot_every=5, replies_kept=3)
    prime(engine)
    for v in range(2, 5):
        engine.patch("s", v, f"r{v}", [brightness_pb([float(v)] * 6)])  # v5: a snapshot
    engine.close()
    recovered = make_engine(tmp_path, snapshot_every=5, replies_kept=3)
    assert list(recovered._sessions["s"].replies) == ["r2", "r3", "r4"]
    assert recovered.patch("s", 2, "r2", [brightness_pb([2.0] * 6)]).version == 3


def failing_log_open(real_open=open):
    """A stand-in for open() in persistence that cannot open a log (snapshots write with "wb")."""

    def fake(path, mode="r", *args, **kwargs):
        if mode == "r+b":
            raise OSError(24, "Too many open files")
        return real_open(path, mode, *args, **kwargs)

    return fake


def test_a_failed_snapshot_keeps_the_log_going_and_waits_before_trying_again(tmp_path, monkeypatch):
    engine = make_engine(tmp_path, snapshot_every=3)
    prime(engine)
    tries = []
    real_begin = engine.store.begin_snapshot
    monkeypatch.setattr(
        engine.store, "begin_snapshot", lambda *a: tries.append(1) or real_begin(*a)
    )
    monkeypatch.setattr(persistence, "open", failing_log_open(), raising=False)
    assert engine.patch("s", 2, "r2", [brightness_pb([1.0] * 6)]).version == 3  # snapshot fails
    monkeypatch.setattr(persistence, "open", open, raising=False)
    for v in range(3, 5):  # the old log takes these; no snapshot is tried until v6
        assert engine.patch("s", v, f"r{v}", [brightness_pb([float(v)] * 6)]).version == v + 1
    assert len(tries) == 1
    expected = snapshot_of(engine)
    engine.close()
    recovered = make_engine(tmp_path, snapshot_every=3)
    assert snapshot_of(recovered) == expected
    assert recovered.patch("s", 2, "r2", [brightness_pb([1.0] * 6)]).replayed
    assert recovered.patch("s", 5, "r5", [brightness_pb([5.0] * 6)]).version == 6


def test_a_failed_snapshot_whose_new_log_cannot_be_removed_breaks_the_session(
    tmp_path, monkeypatch
):
    engine = make_engine(tmp_path, snapshot_every=3)
    prime(engine)
    monkeypatch.setattr(persistence, "open", failing_log_open(), raising=False)

    def no_unlink(self, missing_ok=False):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(persistence.Path, "unlink", no_unlink)
    assert engine.patch("s", 2, "r2", [brightness_pb([1.0] * 6)]).version == 3  # acknowledged
    monkeypatch.undo()
    with pytest.raises(PatchError) as err:
        engine.patch("s", 3, "r3", [brightness_pb([2.0] * 6)])
    assert err.value.status is Status.UNAVAILABLE and "until the authority restarts" in str(err)
    expected = snapshot_of(engine)
    engine.close()
    assert snapshot_of(make_engine(tmp_path, snapshot_every=3)) == expected


def test_a_torn_last_record_is_discarded_but_damage_before_it_refuses_to_start(tmp_path):
    engine = make_engine(tmp_path)
    prime(engine)
    expected = snapshot_of(engine)
    engine.close()
    wal = tmp_path / "sessions" / "s" / "wal-000000000000.log"
    good = wal.read_bytes()
    wal.write_bytes(good + good[: len(good) // 3])  # the process died inside a write
    assert snapshot_of(make_engine(tmp_path)) == expected
    assert wal.read_bytes() == good  # cut back to the last acknowledged record
    damaged = bytearray(good)
    damaged[12] ^= 0xFF  # a flipped byte in the first of two records
    wal.write_bytes(bytes(damaged))
    with pytest.raises(CorruptStore):
        make_engine(tmp_path)


def test_deleted_sessions_are_gone_after_restart(tmp_path):
    engine = make_engine(tmp_path)
    prime(engine, "a")
    prime(engine, "b")
    assert engine.delete_session("a") == 2
    engine.close()
    assert make_engine(tmp_path).session_ids() == ["b"]


def test_sync_plan_gives_deltas_while_the_log_reaches_back_then_a_snapshot():
    engine = make_engine(log_retention=2)
    prime(engine)
    replica = SyncReceiver()
    plan = engine.sync_plan("s", 0)  # a replica holding nothing gets a snapshot
    replica.receive_all(snapshot_messages(*plan.snapshot))
    engine.patch("s", 2, "", a_patch())
    plan = engine.sync_plan("s", 2)
    assert plan.snapshot is None and [c.patch.version for c in plan.deltas] == [3]
    for c in plan.deltas:
        replica.receive_all(delta_messages(c.patch, max_chunk_bytes=200))  # several parts
    assert_same_state(replica.state, engine._sessions["s"].state)
    engine.patch("s", 3, "", [evict_pb(0, 40)])
    engine.patch("s", 4, "", [evict_pb(0, 13)])
    assert engine.sync_plan("s", 2).snapshot is not None  # v3 fell out of the retained log
    assert engine.sync_plan("s", 5).deltas == []


class UnscannableLog(collections.deque):
    """A retained log that refuses to be iterated whole."""

    def __iter__(self):
        raise AssertionError("the whole retained log was scanned")


def test_a_sync_of_the_newest_deltas_does_not_scan_the_retained_log():
    engine = make_engine()
    prime(engine)
    for v in range(2, 40):
        engine.patch("s", v, "", [brightness_pb([float(v)] * 6)])
    session = engine._sessions["s"]
    session.log = UnscannableLog(collections.deque.__iter__(session.log))
    plan = engine.sync_plan("s", 38)
    assert [c.patch.version for c in plan.deltas] == [39, 40]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sessions_survive_snapshot_and_log(tmp_path, dtype):
    engine = make_engine(tmp_path, snapshot_every=3)
    engine.create_session("h", tiny_geometry(dtype), Budget(8, 8), None, lambda s: None)
    for v in range(3):  # v1..v3, a snapshot at v3
        op = session_pb2.PatchOp(
            append=session_pb2.AppendOp(position=v, token_ids=[v], kv=kv_pb(1, v, dtype))
        )
        engine.patch("h", v, "", [op])
    engine.patch("h", 3, "", [evict_pb(0, 0)])  # v4 in the log; the rows after it move
    expected = snapshot_of(engine, "h")
    engine.close()
    assert snapshot_of(make_engine(tmp_path), "h") == expected


def test_patches_to_different_sessions_do_not_wait_for_each_other():
    engine = make_engine()
    prime(engine, "a")
    prime(engine, "b")
    done = threading.Event()
    with engine._sessions["a"].cond:  # someone holds session a's lock for a long time
        t = threading.Thread(
            target=lambda: (engine.patch("b", 2, "", [evict_pb(0, 10)]), done.set())
        )
        t.start()
        assert done.wait(10)  # b committed while a stayed locked
    t.join()
    assert engine.read("b", lambda s: s.version) == 3


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=600),
    shape=st.lists(st.integers(-2, 2**33), max_size=5) | st.just([2, 2, 1, 8]),
    dtype=st.integers(0, 7),
    tokens=st.lists(st.integers(-3, 60), max_size=3),
)
def test_hostile_tensors_are_refused_as_invalid_and_change_nothing(data, shape, dtype, tokens):
    engine = make_engine()
    prime(engine)
    before = snapshot_of(engine)
    keys = tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)
    block = tensor_pb2.KVBlock(keys=keys, values=keys)
    op = session_pb2.PatchOp(append=session_pb2.AppendOp(position=6, token_ids=tokens, kv=block))
    try:
        engine.patch("s", 2, "", [op])
    except PatchError as e:
        assert e.status is Status.INVALID_ARGUMENT, e.message
        assert snapshot_of(engine) == before
    else:  # only a well-formed append can commit: the right shape, dtype, bytes and ids
        assert shape == [2, 2, len(tokens), 8] and dtype == tensor_pb2.DTYPE_FLOAT32
        assert engine.read("s", lambda s: s.live_token_ids()[6:]) == tokens


def _replica_at(engine: Engine, sid: str = "s") -> SyncReceiver:
    replica = SyncReceiver(rotated=True)
    replica.receive_all(snapshot_messages(*engine.sync_plan(sid, 0).snapshot))
    return replica


def test_a_replica_replays_a_verified_delta_without_validating_it_again(monkeypatch):
    """The digest chain names the ops the authority validated against this very state: the
    replica stages and commits them (validating again could only agree, at a fifth of its
    apply)."""
    engine = make_engine()
    prime(engine)
    replica = _replica_at(engine)
    engine.patch("s", 2, "", a_patch())

    def refuse(*args):
        raise AssertionError("validated again")

    monkeypatch.setattr(state_mod, "validate_ops", refuse)
    for c in engine.sync_plan("s", 2, True).deltas:
        replica.receive_all(delta_messages(c.patch))
    assert_same_state(replica.state, engine._sessions["s"].state)


@pytest.mark.parametrize("bad", [[evict_pb(40, 10)], [replace_pb(5, [30, 31], 9, seed=1)]])
def test_a_verified_delta_that_does_not_apply_drops_the_replica_to_resync(bad):
    """An authority's bug (ops that do not fit the rows, digest and all) is a SyncError, and the
    receiver lets go of its half-written state: its owner resyncs from a snapshot, as after a
    digest mismatch."""
    engine = make_engine()
    prime(engine)
    replica = _replica_at(engine)
    patch = session_pb2.CommittedPatch(
        version=3, digest=chain_digest(replica.state.digest, 3, bad), ops=bad
    )
    with pytest.raises(SyncError, match="must resync"):
        replica.receive_all(delta_messages(patch))
    assert replica.state is None


def test_a_patch_serializes_its_ops_once_for_the_fingerprint_and_the_digest(monkeypatch):
    engine = make_engine()
    prime(engine)
    calls: list[int] = []
    real = ops_mod.op_bodies

    def counting(ops):
        calls.append(len(ops))
        return real(ops)

    monkeypatch.setattr(ops_mod, "op_bodies", counting)
    monkeypatch.setattr(engine_mod, "op_bodies", counting)
    result = engine.patch("s", 2, "r", a_patch())
    assert calls == [4]
    assert result.fingerprint == ops_mod.patch_fingerprint(2, a_patch())
    assert result.digest == engine.read("s", lambda s: s.digest)


def test_sync_plan_nowait_answers_deltas_at_once_and_never_waits():
    """A follow stream plans on its event loop: deltas when the session's lock is free and the
    log reaches back; None (plan in the pool) when the lock is held or a snapshot is needed."""
    engine = make_engine(log_retention=2)
    prime(engine)
    engine.patch("s", 2, "", a_patch())
    plan = engine.sync_plan_nowait("s", 2, True)
    assert plan is not None and [c.patch.version for c in plan.deltas] == [3]
    assert engine.sync_plan_nowait("s", 3, True) == engine.sync_plan("s", 3, True)
    assert engine.sync_plan_nowait("s", 0) is None  # a snapshot: built off the loop
    assert engine.sync_plan_nowait("nope", 2) is None  # sync_plan says NOT_FOUND
    with _held_by_another_thread(engine._sessions["s"].cond):
        assert engine.sync_plan_nowait("s", 2, True) is None


def test_try_patch_leaves_a_patch_that_moves_many_rows_to_a_thread(monkeypatch):
    """A few bytes of evicts and merges can move megabytes of rows: the event loop's patch gives
    those back (None, nothing done) so that patch() commits them off the loop (review finding:
    512 evicts of a 1,024-row session held the loop for 10 s)."""
    engine = make_engine()
    prime(engine)
    session = engine._sessions["s"]
    moving = engine_mod._moved_bytes(session.state, a_patch())  # one merge, one evict
    assert moving == 2 * (session.state.row_count // 2 + 1) * session.state.geometry.row_bytes
    assert engine_mod._moved_bytes(session.state, [append_pb(6, [41], seed=4)]) == 0
    monkeypatch.setattr(engine_mod, "INLINE_MOVE_BYTES", moving - 1)
    assert engine.try_patch("s", 2, "r", a_patch()) is None
    assert engine.read("s", lambda s: s.version) == 2 and not session.replies.get("r")
    assert engine.try_patch("s", 2, "a", [append_pb(6, [41], seed=4)]).version == 3  # appends
    assert engine.patch("s", 3, "r", [evict_pb(0, 10)]).version == 4


def test_try_patch_commits_when_no_lock_is_taken_and_never_waits():
    """The event loop's patch: the same commit as patch when the locks are free; None, nothing
    done, when the session's lock is held; the op limit holds for both."""
    engine = make_engine()
    prime(engine)
    with _held_by_another_thread(engine._sessions["s"].cond):
        assert engine.try_patch("s", 2, "r", a_patch()) is None
        assert engine.read("s", lambda s: s.version) == 2
    result = engine.try_patch("s", 2, "r", a_patch())
    assert result is not None and result.version == 3
    assert engine.patch("s", 2, "r", a_patch()).replayed  # the same request, remembered
    for call in (engine.patch, engine.try_patch):
        with pytest.raises(PatchError) as e:
            call("s", 3, "", [evict_pb(0, 40), evict_pb(1, 13)], lambda hard_max: 1)
        assert e.value.status is Status.RESOURCE_EXHAUSTED
