"""Replicas: per session, a SessionState changed only by replaying the authority's commits.

`ReplicaStore.reading(session, version)` holds the session's lock, brings the replica to exactly
`version` by pulling `CacheAuthority.Sync`, and yields its live rows for read-only forwards.
Messages go through the authority's own receiving end (`cache_authority.sync.SyncReceiver`):
each delta's digest is checked against the chain, then applied with `apply_ops` — the code the
authority commits with. A gap, a mismatch or a patch that does not apply makes the replica
resync fully (`from_version=0`, a snapshot).

Versions that cannot be computed on are refused, never approximated:
- the replica (after syncing) holds another version — the authority is behind the request, or
  the replica is already past it (replicas never go back) — ABORTED, with a VersionConflict
  detail naming the version the replica holds;
- the authority cannot be reached at all — UNAVAILABLE (raised by the sync source), so that a
  client can tell "retry later" from "your version is stale";
- the authority does not know the session — NOT_FOUND (and the replica is dropped).

The lock is held while the caller computes: on CPU the rows it yields are views of the replica's
buffers, which the next sync overwrites in place.
"""

from __future__ import annotations

import logging
import threading
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
from model_worker.forward import Rows
from positronic.v1 import cache_authority_pb2

logger = logging.getLogger(__name__)


class SyncSource(Protocol):
    """Where replicas come from: the authority's Sync stream (follow=False)."""

    def sync(
        self, session_id: str, from_version: int
    ) -> Iterable[cache_authority_pb2.SyncResponse]: ...


class _Resync(Exception):
    """The log does not verify from what the replica holds; start again from a snapshot."""


@dataclass
class _Entry:
    lock: threading.Lock = field(default_factory=threading.Lock)
    state: SessionState | None = None
    device_rows: Rows | None = None  # cached copy on an accelerator, for device_version
    device_version: int = -1


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
    ):
        self._source = source
        self._device = torch.device(device)
        self._accept = accept or (lambda g: None)
        self._max = max_replicas
        self._on_bytes = on_sync_bytes or (lambda kind, n: None)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    # -- public -----------------------------------------------------------------------------

    @contextmanager
    def reading(self, session_id: str, version: int, digest: bytes = b"") -> Iterator[Rows]:
        """The session's rows at exactly `version` (and `digest`, when given), read-only,
        valid inside the block."""
        entry = self._entry(session_id)
        with entry.lock:
            state = self._ensure(entry, session_id, version, digest)
            yield self._rows(entry, state)

    def held(self, session_id: str) -> SessionState | None:
        """The replica itself (tests and diagnostics; do not modify)."""
        entry = self._entries.get(session_id)
        return entry.state if entry else None

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._entries.pop(session_id, None)

    # -- syncing ----------------------------------------------------------------------------

    def _entry(self, session_id: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is None:
                entry = self._entries[session_id] = _Entry()
                self._evict_idle()
            self._entries.move_to_end(session_id)
            return entry

    def _evict_idle(self) -> None:
        for sid in list(self._entries)[:-1]:
            if len(self._entries) <= self._max:
                return
            entry = self._entries[sid]
            if entry.lock.acquire(blocking=False):
                try:
                    del self._entries[sid]
                    logger.info("session %s: replica dropped (least recently used)", sid)
                finally:
                    entry.lock.release()

    def _ensure(self, entry: _Entry, session_id: str, version: int, digest: bytes) -> SessionState:
        if version < 0:
            raise WorkerError("INVALID_ARGUMENT", f"version must be >= 0, got {version}")
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

    def _sync_to(self, entry: _Entry, session_id: str, version: int) -> SessionState:
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

    def _pull(self, entry: _Entry, session_id: str, from_version: int, target: int) -> None:
        """Read Sync from `from_version`; stop as soon as the replica reaches `target`.

        The receiving end is the authority's own `SyncReceiver` (snapshot assembly, the digest
        chain, apply_ops); a stream it rejects means "resync fully"."""
        receiver = SyncReceiver(entry.state if from_version > 0 else None, rotated=True)
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

    # -- rows -------------------------------------------------------------------------------

    def _rows(self, entry: _Entry, state: SessionState) -> Rows:
        token_ids = state.live_token_ids()
        offset = state.position_offset
        if self._device.type == "cpu":
            return Rows(state.live_keys(), state.live_values(), token_ids, offset)
        if entry.device_version != state.version or entry.device_rows is None:
            entry.device_rows = Rows(
                state.live_keys().to(self._device),
                state.live_values().to(self._device),
                token_ids,
                offset,
            )
            entry.device_version = state.version
        return entry.device_rows
