"""Replicas follow the authority's log exactly: snapshots, verified deltas, resync on mismatch,
and a refusal (never an approximation) for versions they cannot reach."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from worker_fixtures import MiniAuthority, append_op, new_state, same, snapshot_of
from worker_fixtures import tiny_llama as _tiny_llama

from cache_authority.ops import EvictOp, ReplacePairOp, SetBrightnessOp
from model_worker.errors import WorkerError
from model_worker.model import check_session_geometry
from model_worker.replica import ReplicaStore
from positronic.v1 import cache_authority_pb2

IDS = [1, 5, 9, 14, 20, 7, 30, 11, 12, 40]


@pytest.fixture(scope="module")
def lm():
    return _tiny_llama()


@pytest.fixture
def authority(lm):
    """A session at version 2: 8 prompt rows, then one generated row."""
    a = MiniAuthority()
    a.create(lm, "s")
    a.patch("s", [append_op(lm, IDS[:8])])
    a.patch("s", [append_op(lm, IDS[8:9], 8, context=IDS[:8])])
    return a


class _PullOnly:
    """The authority without follow streams: replicas pull every version they need."""

    def __init__(self, authority):
        self.sync = authority.sync


def _store(authority, lm, follow: bool = False, **kw):
    return ReplicaStore(
        authority if follow else _PullOnly(authority),
        accept=lambda g: check_session_geometry(g, lm.geometry),
        **kw,
    )


def _edit(lm, authority):
    """Version +1: brightness, a merge, an eviction and an append in one patch."""
    state = authority.states["s"]
    n = state.row_count
    ids = state.live_token_ids()
    kv = append_op(lm, [ids[2]], 2, context=ids[:2])
    ops = [
        SetBrightnessOp(n, torch.arange(n, dtype=torch.float32)),
        ReplacePairOp(2, (ids[2], ids[3]), ids[2], kv.keys, kv.values, "x", 9.0),
        EvictOp(5, ids[5]),
        append_op(lm, [IDS[9]], n, context=ids),
    ]
    return authority.patch("s", ops)


def _assert_mirrors(store, authority, session_id="s"):
    replica, master = store.held(session_id), authority.states[session_id]
    assert replica.version == master.version and replica.digest == master.digest
    assert same(snapshot_of(replica, live=True), snapshot_of(master, live=True))
    assert [m.ledger_id for m in replica.meta] == [m.ledger_id for m in master.meta]


def test_first_read_builds_from_a_snapshot(lm, authority):
    store = _store(authority, lm)
    with store.reading("s", 2) as rows:
        assert rows.count == 9 and list(rows.token_ids) == IDS[:9]
        torch.testing.assert_close(rows.keys, authority.states["s"].live_keys(), atol=0, rtol=0)
    assert authority.calls == [("s", 0)]
    _assert_mirrors(store, authority)


@pytest.mark.parametrize("parts", [1, 3])
def test_deltas_are_replayed_bit_for_bit(lm, authority, parts):
    store = _store(authority, lm)
    with store.reading("s", 2):
        pass
    authority.parts = parts
    v = _edit(lm, authority)
    v = authority.patch("s", [append_op(lm, [IDS[0]], authority.states["s"].row_count)])
    with store.reading("s", v):
        pass
    assert authority.calls == [("s", 0), ("s", 2)]
    _assert_mirrors(store, authority)


def test_sync_stops_at_the_version_asked_for(lm, authority):
    store = _store(authority, lm)
    with store.reading("s", 2):
        pass
    v = _edit(lm, authority)
    v2 = authority.patch("s", [append_op(lm, [IDS[0]], authority.states["s"].row_count)])
    with store.reading("s", v):  # the authority is already at v2: stop at v
        assert store.held("s").version == v
    with store.reading("s", v2):
        pass
    assert authority.calls == [("s", 0), ("s", 2), ("s", v)]
    _assert_mirrors(store, authority)


def test_a_new_replica_cannot_go_back(lm, authority):
    with pytest.raises(WorkerError) as e, _store(authority, lm).reading("s", 1):
        pass  # the snapshot is at 2; version 1 is gone
    assert e.value.code == "ABORTED"


def test_version_ahead_of_the_authority_is_aborted(lm, authority):
    store = _store(authority, lm)
    with pytest.raises(WorkerError) as e, store.reading("s", 5):
        pass
    assert e.value.code == "ABORTED"
    (detail,) = e.value.details
    assert isinstance(detail, cache_authority_pb2.VersionConflict)
    assert (detail.current_version, detail.expected_version) == (2, 5)


def test_version_behind_the_replica_is_aborted(lm, authority):
    store = _store(authority, lm)
    with store.reading("s", 2):
        pass
    with pytest.raises(WorkerError) as e, store.reading("s", 1):
        pass
    assert e.value.code == "ABORTED"
    with pytest.raises(WorkerError) as e, store.reading("s", -1):
        pass
    assert e.value.code == "INVALID_ARGUMENT"


def test_digest_mismatch_resyncs_from_a_snapshot(lm, authority):
    store = _store(authority, lm)
    with store.reading("s", 2):
        pass
    v = _edit(lm, authority)
    authority.corrupt_version = v
    with store.reading("s", v):
        pass
    assert authority.calls == [("s", 0), ("s", 2), ("s", 0)]
    _assert_mirrors(store, authority)


def test_a_log_that_does_not_verify_even_from_a_snapshot_is_aborted(lm, authority):
    """A delta arriving where a snapshot was due (from 0) cannot be verified."""
    authority.log_floor = 0
    real = authority._stream

    def deltas_only(session_id, from_version):
        yield from real(session_id, max(from_version, 1))

    authority._stream = deltas_only
    store = _store(authority, lm)
    with pytest.raises(WorkerError) as e, store.reading("s", 2):
        pass
    assert e.value.code == "ABORTED"


def test_unknown_session_and_unreachable_authority(lm, authority):
    store = _store(authority, lm)
    with pytest.raises(WorkerError) as e, store.reading("nope", 0):
        pass
    assert e.value.code == "NOT_FOUND"
    assert store.held("nope") is None
    authority.reachable = False
    with pytest.raises(WorkerError) as e, store.reading("s", 2):
        pass
    assert e.value.code == "UNAVAILABLE"


def test_sessions_of_another_model_are_refused(lm, authority):
    other = _tiny_llama(seed=1)  # same shape, other weights: another fingerprint
    store = _store(authority, other)
    with pytest.raises(WorkerError) as e, store.reading("s", 2):
        pass
    assert e.value.code == "FAILED_PRECONDITION"


def test_least_recently_used_replicas_are_dropped(lm, authority):
    authority.states["t"] = new_state(lm, "t")
    authority.log["t"] = []
    store = _store(authority, lm, max_replicas=1)
    with store.reading("s", 2):
        pass
    with store.reading("t", 0) as rows:
        assert rows.count == 0
    assert store.held("s") is None and store.held("t") is not None


# -- followers: committed patches applied as they land ------------------------------------------
def _wait(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_follower_applies_each_commit_without_a_pull(lm, authority):
    store = _store(authority, lm, True)
    with store.reading("s", 2):
        pass
    assert authority.calls == [("s", 0)] and authority.follows == [("s", 2)]
    v = _edit(lm, authority)
    v = authority.patch("s", [append_op(lm, [IDS[0]], authority.states["s"].row_count)])
    _wait(lambda: store.held("s").version == v)  # no read asked for it
    with store.reading("s", v, authority.states["s"].digest) as rows:
        assert rows.count == authority.states["s"].row_count
    assert authority.calls == [("s", 0)]  # never pulled again
    _assert_mirrors(store, authority)
    store.close()


def test_a_read_ahead_of_the_replica_waits_for_the_follower(lm, authority):
    store = _store(authority, lm, True, follow_wait_s=30.0)
    with store.reading("s", 2):
        pass
    authority.follow_delay_s = 0.3
    v = authority.patch("s", [append_op(lm, [IDS[9]], 9, context=IDS[:9])])
    with store.reading("s", v, authority.states["s"].digest):  # asked before it landed
        pass
    assert authority.calls == [("s", 0)]
    _assert_mirrors(store, authority)
    store.close()


def test_a_pull_and_the_follower_never_apply_a_commit_twice(lm, authority):
    """The follower is slower than the read's patience: the read pulls; the follower then
    skips what the pull applied and goes on with the next commit."""
    store = _store(authority, lm, True, follow_wait_s=0.01)
    with store.reading("s", 2):
        pass
    authority.follow_delay_s = 0.5
    v = _edit(lm, authority)
    with store.reading("s", v):
        pass
    assert authority.calls == [("s", 0), ("s", 2)]
    authority.follow_delay_s = 0.0
    v = authority.patch("s", [append_op(lm, [IDS[0]], authority.states["s"].row_count)])
    _wait(lambda: store.held("s").version == v)
    assert store.following("s")
    _assert_mirrors(store, authority)
    store.close()


def test_a_deleted_session_is_dropped_and_never_computed_on(lm, authority):
    """The follow stream ends with NOT_FOUND: the replica goes at once, and a read at the old
    version and digest answers NOT_FOUND instead of computing on the old rows."""
    store = _store(authority, lm, True)
    digest = authority.states["s"].digest
    with store.reading("s", 2, digest):
        pass
    authority.delete("s")
    _wait(lambda: store.held("s") is None)
    with pytest.raises(WorkerError) as e, store.reading("s", 2, digest):
        pass
    assert e.value.code == "NOT_FOUND"
    store.close()


def test_a_dropped_replica_stops_its_follower(lm, authority):
    authority.states["t"] = new_state(lm, "t")
    authority.log["t"] = []
    store = _store(authority, lm, True, max_replicas=1)
    with store.reading("s", 2):
        pass
    assert store.following("s")
    follower = store._entries["s"].follower
    with store.reading("t", 0):
        pass
    assert store.held("s") is None
    _wait(lambda: not follower.alive)
    store.close()
    assert not store.following("t")


def test_a_followed_commit_that_does_not_verify_drops_the_replica(lm, authority):
    """A delta whose digest breaks the chain: the follower drops the replica's state, and the
    next read rebuilds it from a snapshot."""
    store = _store(authority, lm, True)
    with store.reading("s", 2):
        pass
    state = authority.states["s"]
    with authority._changed:  # the follower reads the log under this lock: it sees only the bad one
        v = authority.patch("s", [append_op(lm, [IDS[9]], 9, context=IDS[:9])])
        good = authority.log["s"][-1]
        authority.log["s"][-1] = type(good)(version=good.version, digest=b"\0" * 32, ops=good.ops)
    _wait(lambda: store.held("s") is None or store.held("s").version == v)
    assert store.held("s") is None
    authority.log["s"][-1] = good
    with store.reading("s", v, state.digest):
        pass
    assert authority.calls[-1] == ("s", 0)
    _assert_mirrors(store, authority)
    store.close()


def test_close_waits_for_a_follower_still_applying_a_delta(lm, authority, monkeypatch):
    """A worker stopping while a follower applies a delta waits for that thread: left running
    into the process's exit, native tensor code can abort it ("terminate called ...")."""
    from model_worker.follower import Follower

    applying = threading.Event()
    slow = Follower._apply_delta

    def slow_apply(self, parts):
        applying.set()
        time.sleep(0.5)
        return slow(self, parts)

    monkeypatch.setattr(Follower, "_apply_delta", slow_apply)
    store = _store(authority, lm, True)
    with store.reading("s", 2):
        pass
    follower = store._entries["s"].follower
    authority.patch("s", [append_op(lm, [IDS[0]], authority.states["s"].row_count)])
    assert applying.wait(20)
    store.close()
    assert not follower._thread.is_alive()


def test_a_followed_delta_that_fails_midway_drops_the_replica_under_its_lock(
    lm, authority, monkeypatch
):
    """A replay keeps no undo log, so a failure of any kind (a device error too, not only a
    SyncError) leaves rows half-written: the follower drops them before releasing the
    replica's lock, and the next read resyncs instead of computing on them."""
    import model_worker.follower as follower_mod

    seen: list[object] = []

    class Failing(follower_mod.SyncReceiver):
        def receive(self, msg):
            raise RuntimeError("device error")

    store = _store(authority, lm, True)
    with store.reading("s", 2):
        pass
    entry = store._entries["s"]
    real_notify = entry.cond.notify_all

    def notify_all():
        seen.append(entry.state)  # what a woken reader would find once the lock is free
        real_notify()

    monkeypatch.setattr(entry.cond, "notify_all", notify_all)
    monkeypatch.setattr(follower_mod, "SyncReceiver", Failing)
    v = authority.patch("s", [append_op(lm, [IDS[0]], authority.states["s"].row_count)])
    _wait(lambda: store.held("s") is None)
    assert seen and seen[0] is None
    monkeypatch.setattr(follower_mod, "SyncReceiver", Failing.__mro__[1])
    with store.reading("s", v, authority.states["s"].digest) as rows:
        assert rows.count == authority.states["s"].row_count
    store.close()
