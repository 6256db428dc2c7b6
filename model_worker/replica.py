"""Live replicas: per session, a SessionState on the worker's device, changed only by replaying
the authority's commits, read in place by every forward.

Each replica is the authority's state class in replica mode (`rotated=True`: keys rotated to the
rows' positions, on the model's device, with `scratch_slots` free slots past the row buffers for
forwards to write into; forward.py). `ReplicaStore.reading(session, version, digest)` yields
`Rows` that view the replica's buffers while holding its lock:
- when a follower runs (follower.py: the session's Sync(follow=True) stream, started after the
  first successful read), committed patches are applied as they land, so the replica is usually
  at `version` already; a read that is ahead waits for the follower, briefly (a condition);
- otherwise, or when the wait runs out, it pulls `CacheAuthority.Sync` up to `version`, through
  the authority's own receiving end (`SyncReceiver`: each delta's digest checked against the
  chain, then `replay_committed`, the stage and commit the authority commits with). A gap, a
  mismatch or a patch that does not apply makes the replica resync fully (`from_version=0`, a
  snapshot).

Versions that cannot be computed on are refused, never approximated:
- the replica (after syncing) holds another version — the authority is behind the request, or
  the replica is already past it (replicas never go back) — ABORTED, with a VersionConflict
  detail naming the version the replica holds;
- the authority cannot be reached at all — UNAVAILABLE (raised by the sync source), so that a
  client can tell "retry later" from "your version is stale";
- the authority does not know the session — NOT_FOUND (and the replica is dropped; a follower
  that sees its session deleted drops it at once).

The lock is held while the caller computes: the rows it yields are views of the replica's
buffers, which the next commit changes in place.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from cache_authority.ops import PatchError
from cache_authority.state import Geometry, SessionState
from cache_authority.sync import SyncError, SyncReceiver
from model_worker.errors import WorkerError
from model_worker.follower import Follower, FollowStream
from model_worker.forward import Rows, Slots
from positronic.v1 import cache_authority_pb2

logger = logging.getLogger(__name__)

# Free slots past each replica's row buffers: room for a forward's new tokens when the rows end
# at the buffers' last slot (a Tick's input token, re-fed rows and repair candidates).
SCRATCH_SLOTS = 64
# How long a read ahead of its replica waits for the follower before pulling itself.
FOLLOW_WAIT_S = 0.5
CLOSE_JOIN_S = 2.0  # how long close() waits for follower threads to end


class SyncSource(Protocol):
    """Where replicas come from: the authority's Sync stream (follow=False). A source may also
    have `follow(session_id, from_version) -> FollowStream` (Sync with follow=True)."""

    def sync(
        self, session_id: str, from_version: int
    ) -> Iterable[cache_authority_pb2.SyncResponse]: ...


class _Resync(Exception):
    """The log does not verify from what the replica holds; start again from a snapshot."""


@dataclass
class Entry:
    """One session's replica, its lock (held by readers while they compute, and by the
    follower while it applies a commit) and its follower."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    state: SessionState | None = None
    follower: Follower | None = None
    gone: bool = False  # the authority deleted the session (a follower saw NOT_FOUND)


def rows_of(state: SessionState) -> Rows:
    """The replica's live rows as views of its buffers, with the slots forwards write after."""
    assert state.rotated_keys is not None, "a replica keeps rotated keys"
    base = state.position_offset
    return Rows(
        state.live_keys(),
        state.live_values(),
        state.live_token_ids(),
        base,
        Slots(state.rotated_keys, state.values, base),
        state.live_canonical_keys(),
        state.live_origin_positions(),
    )


class ReplicaStore:
    """Replicas of many sessions, each behind its own lock; least recently used ones dropped."""

    def __init__(
        self,
        source: SyncSource,
        *,
        device: torch.device | str = "cpu",
        accept: Callable[[Geometry], None] | None = None,
        max_replicas: int = 32,
        on_sync_bytes: Callable[[str, int], None] | None = None,
        on_followed: Callable[[float, float], None] | None = None,
        scratch_slots: int = SCRATCH_SLOTS,
        follow_wait_s: float = FOLLOW_WAIT_S,
    ):
        self._source = source
        self._device = torch.device(device)
        self._accept = accept or (lambda g: None)
        self._max = max_replicas
        self._on_bytes = on_sync_bytes or (lambda kind, n: None)
        self._on_followed = on_followed or (lambda apply_s, lag_s: None)
        self._scratch = scratch_slots
        self._follow_wait_s = follow_wait_s
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()

    # -- public -----------------------------------------------------------------------------
    @contextmanager
    def reading(self, session_id: str, version: int, digest: bytes = b"") -> Iterator[Rows]:
        """The session's rows at exactly `version` (and `digest`, when given), read-only,
        valid inside the block."""
        if version < 0:
            raise WorkerError("INVALID_ARGUMENT", f"version must be >= 0, got {version}")
        entry = self._entry(session_id)
        with entry.cond:
            self._wait_for_follower(entry, version)
            state = self._ensure(entry, session_id, version, digest)
            self._follow(entry, session_id)
            yield rows_of(state)

    def held(self, session_id: str) -> SessionState | None:
        """The replica itself (tests and diagnostics; do not modify)."""
        entry = self._entries.get(session_id)
        return entry.state if entry else None

    def following(self, session_id: str) -> bool:
        """Whether a follower keeps this session's replica current."""
        entry = self._entries.get(session_id)
        return bool(entry and entry.follower and entry.follower.alive)

    def drop(self, session_id: str) -> None:
        with self._lock:
            entry = self._entries.pop(session_id, None)
        if entry is not None and entry.follower is not None:
            entry.follower.stop()

    def close(self, join_s: float = CLOSE_JOIN_S) -> None:
        """Stop every follower (the worker is stopping) and wait, up to join_s in all, for their
        threads to end: a follower still applying a delta (tensor ops in native code) while the
        process exits can abort it ("terminate called without an active exception")."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        followers = [e.follower for e in entries if e.follower is not None]
        for follower in followers:
            follower.stop()
        deadline = time.monotonic() + join_s
        for follower in followers:
            follower.join(max(0.0, deadline - time.monotonic()))

    # -- following --------------------------------------------------------------------------
    def _wait_for_follower(self, entry: Entry, version: int) -> None:
        """A read ahead of its replica waits (briefly) for the follower to apply that version."""
        if entry.follower is None or entry.state is None or entry.state.version >= version:
            return
        entry.cond.wait_for(
            lambda: (
                entry.gone
                or entry.follower is None
                or entry.state is None
                or entry.state.version >= version
            ),
            timeout=self._follow_wait_s,
        )

    def _follow(self, entry: Entry, session_id: str) -> None:
        """Start the session's follower from the replica's version, if none runs."""
        follow = getattr(self._source, "follow", None)
        if follow is None or entry.state is None or entry.gone:
            return
        if entry.follower is not None and entry.follower.alive:
            return
        stream: FollowStream = follow(session_id, entry.state.version)
        entry.follower = Follower(
            entry,
            session_id,
            stream,
            device=self._device,
            scratch_slots=self._scratch,
            accept=self._accept,
            on_bytes=self._on_bytes,
            on_gone=self._gone,
            on_applied=self._on_followed,
        )
        entry.follower.start()

    def _gone(self, session_id: str, entry: Entry) -> None:
        """The authority no longer has the session: drop its replica now (follower thread)."""
        with entry.cond:
            entry.gone = True
            entry.state = None
            entry.cond.notify_all()
        with self._lock:
            if self._entries.get(session_id) is entry:
                del self._entries[session_id]

    # -- syncing ----------------------------------------------------------------------------
    def _entry(self, session_id: str) -> Entry:
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is None:
                entry = self._entries[session_id] = Entry()
                self._evict_idle()
            self._entries.move_to_end(session_id)
            return entry

    def _evict_idle(self) -> None:
        for sid in list(self._entries)[:-1]:
            if len(self._entries) <= self._max:
                return
            entry = self._entries[sid]
            if entry.cond.acquire(blocking=False):
                try:
                    del self._entries[sid]
                    if entry.follower is not None:
                        entry.follower.stop()
                    logger.info("session %s: replica dropped (least recently used)", sid)
                finally:
                    entry.cond.release()

    def _ensure(self, entry: Entry, session_id: str, version: int, digest: bytes) -> SessionState:
        if entry.gone:
            raise WorkerError("NOT_FOUND", f"session {session_id} was deleted")
        try:
            held = entry.state
            if (
                digest
                and held is not None
                and (held.version > version or (held.version == version and held.digest != digest))
            ):
                # Not this session's past (a re-created session, an authority that lost state):
                # start again from a snapshot. Behind the request, the digest chain checks it.
                logger.warning(
                    "session %s: replica at version %d is not on the history the request names; "
                    "resyncing fully",
                    session_id,
                    held.version,
                )
                entry.state = None
            state = self._sync_to(entry, session_id, version)
            if digest and state.digest != digest:
                entry.state = None
                raise WorkerError(
                    "ABORTED",
                    f"session {session_id}: the authority's version {version} has another digest "
                    "than the request names",
                )
            return state
        except WorkerError as e:
            if e.code == "NOT_FOUND":
                self.drop(session_id)
            raise

    def _sync_to(self, entry: Entry, session_id: str, version: int) -> SessionState:
        held = entry.state.version if entry.state else None
        if held is not None and held < version:
            try:
                self._pull(entry, session_id, held, version)
            except _Resync as e:
                logger.warning(
                    "session %s: replica at version %s does not verify (%s); resyncing fully",
                    session_id,
                    entry.state.version if entry.state else None,
                    e,
                )
                entry.state = None
        if entry.state is None:
            try:
                self._pull(entry, session_id, 0, version)
            except _Resync as e:
                entry.state = None
                raise WorkerError(
                    "ABORTED", f"session {session_id}: the authority's log does not verify: {e}"
                ) from None
        state = entry.state
        assert state is not None
        if state.version != version:
            raise WorkerError(
                "ABORTED",
                f"session {session_id}: asked for version {version}, the replica holds "
                f"{state.version} after syncing",
                details=[
                    cache_authority_pb2.VersionConflict(
                        current_version=state.version, expected_version=version
                    )
                ],
            )
        return state

    def _pull(self, entry: Entry, session_id: str, from_version: int, target: int) -> None:
        """Read Sync from `from_version`; stop as soon as the replica reaches `target`.

        The receiving end is the authority's own `SyncReceiver` (snapshot assembly, the digest
        chain, replay_committed); a stream it rejects means "resync fully"."""
        receiver = SyncReceiver(
            entry.state if from_version > 0 else None,
            rotated=True,
            device=self._device,
            scratch_slots=self._scratch,
        )
        stream = self._source.sync(session_id, from_version)
        try:
            for msg in stream:
                kind = msg.WhichOneof("payload")
                self._on_bytes("delta" if kind == "delta" else "snapshot", msg.ByteSize())
                before = receiver.state
                try:
                    if not receiver.receive(msg):
                        continue
                except (SyncError, PatchError) as e:
                    raise _Resync(getattr(e, "message", None) or str(e)) from None
                state = receiver.state
                assert state is not None
                if state is not before:  # a snapshot replaced the replica
                    self._accept(state.geometry)
                    logger.info(
                        "session %s: replica rebuilt from a snapshot at version %d (%d rows)",
                        session_id,
                        state.version,
                        state.row_count,
                    )
                entry.state = state
                if state.version >= target:
                    break
        finally:
            cancel = getattr(stream, "cancel", None)
            if cancel is not None:
                cancel()
