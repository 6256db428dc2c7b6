"""The session registry: which sessions exist, their locks, and their life (create, read, delete).

The patch engine (engine.py) builds on it; nothing here changes a session's rows.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar, overload

from cache_authority.feed import Feed, WatchEvent
from cache_authority.metrics import Metrics
from cache_authority.ops import GENESIS_DIGEST, PatchError, Status
from cache_authority.persistence import SessionStore
from cache_authority.rows import Budget, Geometry, SessionState
from positronic.limits import MAX_BRIGHTNESS, check_session_id, clip
from positronic.v1 import session_pb2

logger = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_SEED_BRIGHTNESS = 255.0  # the Halo Weave seed, for a CreateSession that names none


@dataclass(frozen=True)
class EngineLimits:
    max_session_bytes: int = 8 << 30  # one session's preallocated rows
    max_total_bytes: int = 32 << 30  # every session's rows together
    log_retention: int = 1024  # committed patches kept in memory for Sync deltas
    log_retention_bytes: int = 256 << 20  # ... and at most this many bytes of them
    replies_kept: int = 4096  # request ids remembered per session for idempotent retries
    snapshot_every: int = 1000  # versions between snapshots on disk


@dataclass(frozen=True)
class PatchResult:
    version: int
    digest: bytes
    row_count: int
    apply_ns: int
    replayed: bool = False
    # ops.patch_fingerprint of the request, so that a reused request id with another patch is
    # refused; empty for replies recovered from snapshots written before fingerprints were kept.
    fingerprint: bytes = b""
    durable: bool = False  # on stable storage before the reply (the fsync durability setting)


@dataclass(frozen=True)
class Committed:
    """A committed patch as the retained log keeps it."""

    patch: session_pb2.CommittedPatch
    row_count: int
    appended: int
    merged: int
    evicted: int

    def event(self, session_id: str) -> WatchEvent:
        p = self.patch
        return WatchEvent(
            session_id,
            p.version,
            p.digest,
            p.request_id,
            self.row_count,
            self.appended,
            self.merged,
            self.evicted,
            p.committed_unix_ns,
        )


@dataclass
class SessionSlot:
    state: SessionState
    cond: threading.Condition = field(default_factory=threading.Condition)
    log: deque[Committed] = field(default_factory=deque)
    log_bytes: int = 0
    replies: OrderedDict[str, PatchResult] = field(default_factory=OrderedDict)
    snapshot_tried: int = 0  # version of the last snapshot attempt, whether it worked or not
    deleted: bool = False
    broken: bool = False  # the log could not be repaired after a failed write or commit


class SessionRegistry:
    def __init__(
        self,
        limits: EngineLimits | None = None,
        store: SessionStore | None = None,
        metrics: Metrics | None = None,
    ):
        self.limits = limits or EngineLimits()
        self.store = store
        self.metrics = metrics or Metrics()
        self.feed = Feed()
        self._lock = threading.Lock()  # guards _sessions (the dict, not the sessions)
        self._sessions: dict[str, SessionSlot] = {}
        self._closed = False

    # -- sessions ---------------------------------------------------------------------------
    def create_session(
        self,
        session_id: str,
        geometry: Geometry,
        budget: Budget,
        seed_brightness: float | None,
        describe: Callable[[SessionState], T],
    ) -> T:
        """A new session at version 0; seed_brightness None means DEFAULT_SEED_BRIGHTNESS."""
        session_id = session_id or uuid.uuid4().hex
        problem = check_session_id(session_id)
        if problem:
            raise PatchError(Status.INVALID_ARGUMENT, problem)
        if seed_brightness is None:
            seed_brightness = DEFAULT_SEED_BRIGHTNESS
        if not 0 <= seed_brightness <= MAX_BRIGHTNESS:  # NaN fails both comparisons
            raise PatchError(
                Status.INVALID_ARGUMENT,
                f"seed brightness {clip(seed_brightness)} must lie in [0, {MAX_BRIGHTNESS:g}]",
            )
        need = geometry.session_bytes(budget.hard_max_rows)
        if need > self.limits.max_session_bytes:
            raise PatchError(
                Status.RESOURCE_EXHAUSTED,
                f"{budget.hard_max_rows} rows need {need} "
                f"bytes, over the limit of {self.limits.max_session_bytes}",
            )
        with self._lock:
            self._check_open()
            if session_id in self._sessions:
                raise PatchError(Status.ALREADY_EXISTS, f"session {session_id} exists")
            held = sum(
                s.state.geometry.session_bytes(s.state.budget.hard_max_rows)
                for s in self._sessions.values()
            )
            if held + need > self.limits.max_total_bytes:
                raise PatchError(
                    Status.RESOURCE_EXHAUSTED,
                    f"{need} more bytes would exceed the "
                    f"authority's limit of {self.limits.max_total_bytes}",
                )
            state = SessionState(
                session_id,
                geometry,
                budget,
                seed_brightness,
                digest=GENESIS_DIGEST,
                created_unix_ns=time.time_ns(),
            )
            store = self.store
            if store is not None:
                self._durably(lambda: store.create(state), state)
            session = SessionSlot(state)
            self._sessions[session_id] = session
            with session.cond:
                logger.info(
                    "session %s v0: created, %d rows preallocated", session_id, budget.hard_max_rows
                )
                self.metrics.set_session(state)
                return describe(state)

    def delete_session(self, session_id: str) -> int:
        """Forget a session, on disk first: a failed delete leaves it whole, not half gone."""
        session = self._session(session_id)
        with session.cond:
            self._check_live(session)
            st = session.state
            store = self.store
            if store is not None:
                self._durably(lambda: store.delete(session_id), st)
            session.deleted = True
            session.cond.notify_all()
            with self._lock:
                self._sessions.pop(session_id, None)
            event = WatchEvent(session_id, st.version, st.digest, "", 0, 0, 0, 0, time.time_ns())
            self.feed.publish(replace(event, deleted=True))
        version = st.version
        self.metrics.remove_session(session_id)
        logger.info("session %s v%d: deleted", session_id, version)
        return version

    def read(self, session_id: str, fn: Callable[[SessionState], T]) -> T:
        """fn(state) under the session's lock: a consistent view for GetSession and friends."""
        session = self._session(session_id)
        with session.cond:
            self._check_live(session)
            return fn(session.state)

    def read_all(self, fn: Callable[[SessionState], T]) -> list[T]:
        with self._lock:
            sessions = sorted(self._sessions.items())
        out = []
        for _, session in sessions:
            with session.cond:
                if not session.deleted:
                    out.append(fn(session.state))
        return out

    def session_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._sessions)

    def _durably(self, write: Callable[[], T], st: SessionState) -> T:
        try:
            return write()
        except OSError as e:
            logger.error("session %s v%d: persisting failed: %s", st.session_id, st.version, e)
            raise PatchError(Status.UNAVAILABLE, f"could not persist: {e.strerror or e}") from e

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sessions = list(self._sessions.values())
        for s in sessions:
            with s.cond:  # a patch in flight finishes its log write before the log closes
                s.cond.notify_all()
                if self.store is not None:
                    self.store.close_session(s.state.session_id)
        self.feed.close()
        if self.store is not None:
            self.store.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @overload
    def _session(self, session_id: str) -> SessionSlot: ...
    @overload
    def _session(self, session_id: str, blocking: bool) -> SessionSlot | None: ...

    def _session(self, session_id: str, blocking: bool = True) -> SessionSlot | None:
        """The live session (NOT_FOUND otherwise); None when not `blocking` and the registry's
        lock is held (a session being created or deleted)."""
        problem = check_session_id(session_id)
        if problem:  # no such id can exist; say why rather than NOT_FOUND
            raise PatchError(Status.INVALID_ARGUMENT, problem)
        if not self._lock.acquire(blocking=blocking):
            return None
        try:
            self._check_open()
            session = self._sessions.get(session_id)
        finally:
            self._lock.release()
        if session is None:
            raise PatchError(Status.NOT_FOUND, f"no session {session_id!r}")
        return session

    def _check_live(self, session: SessionSlot) -> None:
        if session.deleted:
            raise PatchError(Status.NOT_FOUND, f"session {session.state.session_id} was deleted")
        self._check_open()

    def _check_open(self) -> None:
        if self._closed:
            raise PatchError(Status.UNAVAILABLE, "the authority is shutting down")
