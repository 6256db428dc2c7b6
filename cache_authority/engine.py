"""The patch engine: every session, and the one place their state changes.

A patch runs under its session's lock: request_id replay -> expected_version check -> decode ->
validate -> stage -> digest -> write-ahead log (fsynced as durability.py says) -> commit. Anything
that fails before the commit changes nothing; a commit that fails restores the rows and cuts its
record off the log. A log that cannot be cut back marks the session broken: patches UNAVAILABLE
until a restart.
Sessions have a lock each, so patches to different sessions run concurrently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from cache_authority.feed import WatchEvent
from cache_authority.metrics import Metrics
from cache_authority.ops import (
    PatchError,
    Status,
    canonicalize,
    chain_digest,
    op_bodies,
    ops_from_pb,
    patch_fingerprint,
)
from cache_authority.persistence import (
    LogRepairFailed,
    PendingSnapshot,
    SessionStore,
    StoredReply,
)
from cache_authority.sessions import (
    Committed,
    EngineLimits,
    PatchResult,
    SessionRegistry,
    SessionSlot,
)
from cache_authority.snapshot import state_to_snapshot
from cache_authority.state import commit_staged, stage_ops, validate_ops
from positronic.limits import clip
from positronic.v1 import cache_authority_pb2, session_pb2

logger = logging.getLogger(__name__)


@contextmanager
def _locked(lock, blocking: bool) -> Iterator[bool]:
    """`with lock`, or, when not blocking, only if it is free at once: yields whether held."""
    got = lock.acquire(blocking=blocking)
    try:
        yield got
    finally:
        if got:
            lock.release()


@dataclass(frozen=True)
class SyncPlan:
    """What a replica at some version needs: the deltas after it, or a full snapshot."""

    version: int
    deltas: list[Committed] = field(default_factory=list)
    snapshot: tuple[cache_authority_pb2.SnapshotHeader, bytes] | None = None


class Engine(SessionRegistry):
    def __init__(
        self,
        limits: EngineLimits | None = None,
        store: SessionStore | None = None,
        metrics: Metrics | None = None,
    ):
        super().__init__(limits, store, metrics)
        # One thread writes every session's snapshots, off the patches' path.
        self._snapshot_thread = ThreadPoolExecutor(1, thread_name_prefix="snapshot")
        self._snapshot_writes: dict[str, Future[None]] = {}
        if store is not None:
            durable = store.acknowledges_durably
            for rec in store.recover_all():
                s = SessionSlot(rec.state, snapshot_tried=rec.state.version - len(rec.replayed))
                for reply in rec.replies:  # patches in the snapshot, then those in the log
                    self._remember(
                        s,
                        reply.request_id,
                        PatchResult(
                            reply.version,
                            reply.digest,
                            reply.row_count,
                            0,
                            fingerprint=reply.fingerprint,
                            durable=durable,
                        ),
                    )
                for r in rec.replayed:
                    c = Committed(r.patch, r.row_count, r.appended, r.merged, r.evicted)
                    self._retain(s, c)
                    if r.patch.request_id:
                        self._remember(
                            s,
                            r.patch.request_id,
                            PatchResult(
                                r.patch.version,
                                r.patch.digest,
                                r.row_count,
                                0,
                                fingerprint=patch_fingerprint(
                                    r.patch.version - 1, list(r.patch.ops)
                                ),
                                durable=durable,
                            ),
                        )
                self._sessions[rec.state.session_id] = s
                self.metrics.set_session(rec.state)

    # -- the patch --------------------------------------------------------------------------
    def patch(
        self,
        session_id: str,
        expected_version: int,
        request_id: str,
        ops_pb: Sequence[session_pb2.PatchOp],
        max_ops: Callable[[int], int] | None = None,
    ) -> PatchResult:
        """Apply ops at expected_version and commit version + 1, all or nothing. `max_ops`:
        the most ops a session of this hard maximum may take (RESOURCE_EXHAUSTED above it)."""
        result = self._timed_patch(session_id, expected_version, request_id, ops_pb, max_ops, True)
        assert result is not None  # a blocking patch always has an outcome
        return result

    def try_patch(
        self,
        session_id: str,
        expected_version: int,
        request_id: str,
        ops_pb: Sequence[session_pb2.PatchOp],
        max_ops: Callable[[int], int] | None = None,
    ) -> PatchResult | None:
        """patch, or None at once (nothing done) when it would have to wait for a lock: for an
        event loop, which must not wait (a lock held by a snapshot, a Sync plan or another
        patch of the session)."""
        return self._timed_patch(session_id, expected_version, request_id, ops_pb, max_ops, False)

    def _timed_patch(
        self, session_id, expected_version, request_id, ops_pb, max_ops, blocking
    ) -> PatchResult | None:
        t0 = time.perf_counter_ns()
        try:
            result = self._patch(
                session_id, expected_version, request_id, ops_pb, t0, max_ops, blocking
            )
        except PatchError as e:
            self.metrics.observe_patch(time.perf_counter_ns() - t0, e.status.value)
            raise
        if result is not None:
            self.metrics.observe_patch(result.apply_ns, "REPLAYED" if result.replayed else "OK")
        return result

    def _patch(
        self, session_id, expected_version, request_id, ops_pb, t0, max_ops, blocking
    ) -> PatchResult | None:
        session = self._session(session_id, blocking)
        if session is None:
            return None
        with _locked(session.cond, blocking) as got:
            if not got:
                return None
            self._check_live(session)
            hard_max = session.state.budget.hard_max_rows
            if max_ops is not None and len(ops_pb) > max_ops(hard_max):
                raise PatchError(
                    Status.RESOURCE_EXHAUSTED,
                    f"patch carries {len(ops_pb)} ops, more than this session can use",
                )
            if not blocking and _moved_bytes(session.state, ops_pb) > INLINE_MOVE_BYTES:
                return None  # rows to move: a thread's work, never the event loop's
            canonicalize(ops_pb)
            bodies = op_bodies(ops_pb)  # serialized once: the fingerprint and the digest hash them
            fingerprint = patch_fingerprint(expected_version, ops_pb, bodies)
            if request_id and request_id in session.replies:
                # A retry gets the stored reply; the same id with another patch is refused, not
                # answered with the first reply while its own ops are silently dropped.
                stored = session.replies[request_id]
                if stored.fingerprint and stored.fingerprint != fingerprint:
                    raise PatchError(
                        Status.ALREADY_EXISTS,
                        f"session {session_id}: request id {clip(request_id)} was used by "
                        f"another patch (committed as v{stored.version}); use a new id",
                    )
                return replace(stored, replayed=True)
            st = session.state
            if session.broken:
                raise PatchError(
                    Status.UNAVAILABLE,
                    f"session {session_id} v{st.version}: its log could not be repaired after a "
                    "failed write; it takes no patches until the authority restarts",
                )
            if expected_version != st.version:
                raise PatchError(
                    Status.ABORTED,
                    f"session {session_id} is at version {st.version}, not {expected_version}",
                    current_version=st.version,
                )
            ops = ops_from_pb(ops_pb)
            validate_ops(st, ops)
            version = st.version + 1
            staged = stage_ops(st, ops, version)
            digest = chain_digest(st.digest, version, ops_pb, bodies)
            patch = session_pb2.CommittedPatch(
                version=version,
                digest=digest,
                request_id=request_id,
                ops=ops_pb,
                committed_unix_ns=time.time_ns(),
            )
            mark, store = None, self.store
            if store is not None:
                try:
                    mark = self._durably(lambda: store.append(session_id, patch), st)
                except LogRepairFailed as e:
                    self._break(session, e)
                    raise PatchError(
                        Status.UNAVAILABLE, f"could not persist, and the log is now broken: {e}"
                    ) from e
            try:
                commit_staged(st, staged, digest)
            except BaseException:
                if store is not None and mark is not None:
                    self._rollback_log(store, session, mark)
                raise
            durable = store is not None and store.acknowledges_durably
            elapsed = time.perf_counter_ns() - t0
            result = PatchResult(
                version, digest, st.row_count, elapsed, fingerprint=fingerprint, durable=durable
            )
            committed = Committed(
                patch, st.row_count, staged.appended, staged.merged, staged.evicted
            )
            self._after_commit(session, committed, result)
            logger.debug(
                "session %s v%d: committed, %d rows (+%d, %d merged, %d evicted)",
                session_id, version, st.row_count, staged.appended, staged.merged, staged.evicted,
            )  # fmt: skip
            return result

    def _after_commit(
        self, session: SessionSlot, committed: Committed, result: PatchResult
    ) -> None:
        """Bookkeeping of a commit that already happened: it must not turn a success into an
        error, so failures here are logged, not raised."""
        st = session.state
        try:
            self._retain(session, committed)
            if committed.patch.request_id:
                self._remember(session, committed.patch.request_id, result)
            session.cond.notify_all()
            self.feed.publish(committed.event(st.session_id))
            self.metrics.set_session(st)
            self._snapshot_if_due(session)
        except Exception:
            logger.exception(
                "session %s v%d: bookkeeping after commit failed", st.session_id, st.version
            )

    def _snapshot_if_due(self, session: SessionSlot) -> None:
        """A snapshot every snapshot_every versions. Under the lock only its copy of the live
        rows and the switch to a new log happen; the file is written by the snapshot thread, so
        the patch that triggers it does not wait for the disk. One that fails is tried again
        only snapshot_every versions later; the logs go on meanwhile (recovery replays them)."""
        st, store = session.state, self.store
        if store is None or st.version - session.snapshot_tried < self.limits.snapshot_every:
            return
        sid = st.session_id
        writing = self._snapshot_writes.get(sid)
        if writing is not None:
            # Still being written only when snapshots come faster than the disk takes them:
            # then this commit waits, so that at most one copy of the rows is in flight.
            writing.exception()
        session.snapshot_tried = st.version
        replies = [
            StoredReply(rid, r.version, r.digest, r.row_count, r.fingerprint)
            for rid, r in session.replies.items()
        ]
        try:
            pending = store.begin_snapshot(st, replies)
        except LogRepairFailed as e:
            self._break(session, e)
            return
        except OSError as e:
            logger.warning(
                "session %s v%d: snapshot failed (%s); the log goes on, next try at v%d",
                sid, st.version, e, st.version + self.limits.snapshot_every,
            )  # fmt: skip
            return
        self._snapshot_writes[sid] = self._snapshot_thread.submit(
            self._finish_snapshot, store, pending
        )

    def _finish_snapshot(self, store: SessionStore, pending: PendingSnapshot) -> None:
        try:
            store.finish_snapshot(pending)
        except OSError as e:
            logger.warning(
                "session %s v%d: writing the snapshot failed (%s); the logs go on",
                pending.session_id, pending.version, e,
            )  # fmt: skip

    def wait_for_snapshots(self) -> None:
        """Block until every snapshot begun so far is written (or has failed)."""
        for future in list(self._snapshot_writes.values()):
            future.exception()

    def delete_session(self, session_id: str) -> int:
        """As SessionRegistry.delete_session, once the session's snapshot being written (if
        any) is done: it writes into the folder the deletion moves away."""
        session = self._session(session_id)
        with session.cond:  # no new snapshot can begin meanwhile; the write needs no lock
            writing = self._snapshot_writes.pop(session_id, None)
            if writing is not None:
                writing.exception()
            return super().delete_session(session_id)

    def close(self) -> None:
        self._snapshot_thread.shutdown(wait=True)  # what was begun reaches the disk
        super().close()

    def _retain(self, session: SessionSlot, committed: Committed) -> None:
        session.log.append(committed)
        session.log_bytes += committed.patch.ByteSize()
        while session.log and (
            len(session.log) > self.limits.log_retention
            or session.log_bytes > self.limits.log_retention_bytes
        ):
            session.log_bytes -= session.log.popleft().patch.ByteSize()

    def _remember(self, session: SessionSlot, request_id: str, result: PatchResult) -> None:
        session.replies[request_id] = result
        while len(session.replies) > self.limits.replies_kept:
            session.replies.popitem(last=False)

    def _rollback_log(self, store: SessionStore, session: SessionSlot, mark: int) -> None:
        try:
            store.rollback(session.state.session_id, mark)
        except LogRepairFailed as e:
            self._break(session, e)

    def _break(self, session: SessionSlot, error: LogRepairFailed) -> None:
        """No more patches to this session until a restart; reads and replies are still served."""
        session.broken = True
        st = session.state
        logger.error(
            "session %s v%d: the log could not be repaired (%s); refusing patches until restart",
            st.session_id, st.version, error,
        )  # fmt: skip

    # -- sync and watch ---------------------------------------------------------------------
    def sync_plan(self, session_id: str, from_version: int, holds_state: bool = False) -> SyncPlan:
        """Deltas after from_version when the retained log reaches back, else a snapshot.

        A replica at from_version 0 holds nothing, not even the geometry, so it gets a snapshot
        unless `holds_state` says it has the empty session already (a follower after its first
        snapshot). A replica ahead of the authority gets a snapshot: its history is not ours.
        """
        session = self._session(session_id)
        with session.cond:
            self._check_live(session)
            plan = self._delta_plan(session, from_version, holds_state)
            if plan is not None:
                return plan
            return SyncPlan(session.state.version, snapshot=state_to_snapshot(session.state))

    def sync_plan_nowait(
        self, session_id: str, from_version: int, holds_state: bool = False
    ) -> SyncPlan | None:
        """sync_plan when it can be answered at once: no lock held by anyone else and no
        snapshot to build (the retained log reaches back). None otherwise (also for a session
        that is gone: sync_plan says why). For an event loop, which must not wait on a lock:
        a follow stream answers each commit here instead of hopping to a pool thread."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            session = self._sessions.get(session_id)
        finally:
            self._lock.release()
        if session is None or not session.cond.acquire(blocking=False):
            return None
        try:
            if session.deleted or self._closed:
                return None
            return self._delta_plan(session, from_version, holds_state)
        finally:
            session.cond.release()

    def _delta_plan(
        self, session: SessionSlot, from_version: int, holds_state: bool
    ) -> SyncPlan | None:
        """The deltas a replica at from_version needs (none when it is current), or None when
        it needs a snapshot. Under the session's lock."""
        st = session.state
        holds = holds_state or from_version > 0
        if holds and from_version == st.version:
            return SyncPlan(st.version)
        log = session.log
        if holds and from_version < st.version and log and log[0].patch.version <= from_version + 1:
            # The log holds consecutive versions: index the ones wanted instead of scanning
            # the whole retained log (up to log_retention entries) on every replica's Sync
            # under the session's lock. Indexing a deque near its end is O(1).
            first = from_version + 1 - log[0].patch.version
            deltas = [log[i] for i in range(first, len(log))]
            return SyncPlan(st.version, deltas=deltas)
        return None

    def wait_for_version(self, session_id: str, after: int, timeout: float) -> bool:
        """Block until the session passes version `after` (True) or `timeout` passes (False)."""
        session = self._session(session_id)
        with session.cond:
            session.cond.wait_for(
                lambda: session.state.version > after or session.deleted or self._closed, timeout
            )
            self._check_live(session)
            return session.state.version > after

    def retained_events(self, session_id: str, after: int) -> list[WatchEvent]:
        session = self._session(session_id)
        with session.cond:
            return [c.event(session_id) for c in session.log if c.patch.version > after]

    def patch_byte_limit(self, session_id: str) -> int:
        """Largest sensible Patch stream for this session: every row appended and merged once,
        plus brightness, plus generous headroom for ids and pieces."""
        row_bytes, rows = self.read(
            session_id, lambda s: (s.geometry.row_bytes, s.budget.hard_max_rows)
        )
        return 2 * rows * (row_bytes + 256) + (64 << 10)


# An event loop commits a patch itself (try_patch) only when the rows it may move stay under
# this: an evict or a merge shifts the shorter side of the live rows (up to half of them), so a
# few bytes on the wire can mean megabytes of K/V moved (a merge in a 2,048-row TinyLlama-shaped
# session: ~23 MiB), which must not stall every other stream on the loop.
INLINE_MOVE_BYTES = 1 << 20


def _moved_bytes(state, ops_pb: Sequence[session_pb2.PatchOp]) -> int:
    """An upper bound of the K/V bytes the patch's evicts and merges may move."""
    moving = sum(op.WhichOneof("op") in ("evict", "replace_pair") for op in ops_pb)
    return moving * (state.row_count // 2 + 1) * state.geometry.row_bytes
