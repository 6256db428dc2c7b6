"""A replica's follower: one `Sync(follow=True)` stream per session, applied as commits land.

The authority pushes every committed patch of the session to the stream (each with its digest);
the follower applies it to the live replica in place, through the authority's own receiving end
(`SyncReceiver`: the digest chain, then `replay_committed`), under the replica's lock, and wakes the
readers waiting for that version. So the replica is current when the next compute call arrives
and the pull (`ReplicaStore._pull`) is only the fallback: for the first read of a session, and
whenever no follower runs.

A follower never guesses: a delta the replica already holds (a pull got there first) is skipped,
one that does not verify drops the replica's state (the next read resyncs from a snapshot), a
session the authority no longer knows (NOT_FOUND: deleted) drops the replica, and any other end
of the stream (the authority restarting, a cancel when the replica is dropped) just ends the
follower; the next read pulls and starts a new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import torch

from cache_authority.ops import PatchError
from cache_authority.state import Geometry, SessionState
from cache_authority.sync import SyncError, SyncReceiver
from model_worker.errors import WorkerError
from positronic.v1 import cache_authority_pb2

if TYPE_CHECKING:
    from model_worker.replica import Entry

logger = logging.getLogger(__name__)


class FollowStream(Protocol):
    """A Sync(follow=True) response stream that can be ended from another thread."""

    def __iter__(self): ...

    def cancel(self) -> None: ...


class Follower:
    """Keeps one replica current from its session's follow stream, in a thread of its own."""

    def __init__(
        self,
        entry: Entry,
        session_id: str,
        stream: FollowStream,
        *,
        device: torch.device,
        scratch_slots: int,
        accept: Callable[[Geometry], None],
        on_bytes: Callable[[str, int], None],
        on_gone: Callable[[str, Entry], None],
        on_applied: Callable[[float, float], None] = lambda apply_s, lag_s: None,
    ):
        self.entry = entry
        self.session_id = session_id
        self._stream = stream
        self._device, self._scratch = device, scratch_slots
        self._accept, self._on_bytes, self._on_gone = accept, on_bytes, on_gone
        self._on_applied = on_applied  # (apply seconds, seconds since the commit), per delta
        self._stopped = False
        self._thread = threading.Thread(
            target=self._run, name=f"follow-{session_id[:32]}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the stream (from any thread); the follower thread then exits."""
        self._stopped = True
        self._stream.cancel()

    def join(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for the thread to end (after stop()); True when it has."""
        if self._thread.ident is not None:
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return not self._stopped and self._thread.is_alive()

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._apply_all(self._stream)
        except WorkerError as e:
            if e.code == "NOT_FOUND":
                logger.info(
                    "session %s: deleted at the authority; replica dropped", self.session_id
                )
                self._on_gone(self.session_id, self.entry)
            elif not self._stopped:
                logger.warning("session %s: follow stream ended: %s", self.session_id, e.message)
        except (SyncError, PatchError) as e:
            message = getattr(e, "message", None) or str(e)
            logger.warning(
                "session %s: a followed commit does not verify (%s); the next read resyncs",
                self.session_id,
                message,
            )
            with self.entry.cond:
                self.entry.state = None
        except Exception:
            logger.exception("session %s: follower failed", self.session_id)
        finally:
            self._stopped = True
            with self.entry.cond:
                if self.entry.follower is self:
                    self.entry.follower = None
                self.entry.cond.notify_all()

    def _apply_all(self, messages: Iterable[cache_authority_pb2.SyncResponse]) -> None:
        parts: list[cache_authority_pb2.SyncResponse] = []  # of the delta being received
        snapshot: SyncReceiver | None = None
        for msg in messages:
            if self._stopped:
                return
            kind = msg.WhichOneof("payload")
            self._on_bytes("delta" if kind == "delta" else "snapshot", msg.ByteSize())
            if kind == "delta":
                parts.append(msg)
                if msg.delta.final:
                    self._apply_delta(parts)
                    parts = []
                continue
            if kind == "snapshot_header":
                snapshot = SyncReceiver(
                    rotated=True, device=self._device, scratch_slots=self._scratch
                )
            if snapshot is None:
                raise SyncError("snapshot chunk before its header")
            if snapshot.receive(msg):
                assert snapshot.state is not None
                self._take_snapshot(snapshot.state)
                snapshot = None

    def _apply_delta(self, parts: list[cache_authority_pb2.SyncResponse]) -> None:
        patch = parts[-1].delta.patch
        version = patch.version
        with self.entry.cond:
            state = self.entry.state
            if state is None:
                raise SyncError(f"delta v{version} for a replica that holds nothing")
            if version <= state.version:
                return  # a pull applied it already
            t0 = time.perf_counter()
            receiver = SyncReceiver(state, rotated=True)
            try:
                for msg in parts:
                    receiver.receive(msg)
            except BaseException:
                # A replay keeps no undo log: the rows may be half-written. Drop them before the
                # lock is released, so that no reader ever computes on (or pulls on top of) them.
                self.entry.state = None
                raise
            finally:
                self.entry.cond.notify_all()
        self._on_applied(time.perf_counter() - t0, (time.time_ns() - patch.committed_unix_ns) / 1e9)

    def _take_snapshot(self, state: SessionState) -> None:
        self._accept(state.geometry)
        with self.entry.cond:
            held = self.entry.state
            # Older than the replica: a pull got further meanwhile (a replica on another history
            # is caught by the digest every read names).
            if (
                held is None
                or state.version > held.version
                or (state.version == held.version and state.digest != held.digest)
            ):
                self.entry.state = state
                logger.info(
                    "session %s: replica rebuilt from a followed snapshot at version %d",
                    self.session_id,
                    state.version,
                )
                self.entry.cond.notify_all()
