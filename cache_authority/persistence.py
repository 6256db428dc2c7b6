"""Durable sessions: a write-ahead log of committed patches plus periodic snapshots.

Layout under the data dir, one folder per session (file names and the record format: wal.py):
  sessions/<id>/snapshot-<version>.safetensors  canonical keys + values, SnapshotHeader and the
                                                recent request ids' replies in metadata
  sessions/<id>/wal-<version>.log               patches after that version, one record each
Each record is written before its patch is acknowledged and fsynced as the durability setting
says (durability.py: before the reply, by a background flusher, or never). A snapshot happens in
two steps: under the session's lock `begin_snapshot` copies the live rows and starts the next
log (so later patches land there); off the lock `finish_snapshot` writes the file and drops the
older ones, so a patch never waits for a large snapshot's write. Recovery loads the newest
readable snapshot and replays every later record through the same apply_ops a replica uses,
checking the digest chain. A torn last record (the process died while writing it) was never
acknowledged and is cut off; damage anywhere else refuses to start, except in the batch and
none settings, where a log is cut at its first bad record (and any later log dropped).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cache_authority.durability import Durability, Flusher
from cache_authority.ops import chain_digest, ops_from_pb
from cache_authority.rows import SessionState
from cache_authority.snapshot_files import (
    PendingSnapshot,
    StoredReply,
    capture,
    fsync_dir,
    load_snapshot,
    write_snapshot,
)
from cache_authority.state import apply_ops
from cache_authority.wal import (
    CorruptStore,
    encode_record,
    read_records,
    version_of,
    versioned,
    wal_name,
)
from positronic.v1 import session_pb2

logger = logging.getLogger(__name__)

__all__ = ["CorruptStore", "LogRepairFailed", "PendingSnapshot", "SessionStore", "StoredReply"]


class LogRepairFailed(Exception):
    """A failed write could not be cut off the log. Appending more would bury garbage in front
    of later records, so the session must take no patch until a restart recovers it (recovery
    cuts a torn tail off)."""


@dataclass(frozen=True)
class Replayed:
    """A log record replayed at recovery, with what it did (the engine's retained log needs it)."""

    patch: session_pb2.CommittedPatch
    row_count: int
    appended: int
    merged: int
    evicted: int


@dataclass
class Recovered:
    """A session read back from disk: its snapshot's stored replies (oldest first) and the log
    records replayed on top of the snapshot."""

    state: SessionState
    replayed: list[Replayed]
    replies: list[StoredReply] = field(default_factory=list)


class SessionStore:
    """Persistence for every session of one authority. Callers hold the session's lock, except
    around finish_snapshot (which touches only files no patch writes)."""

    def __init__(
        self,
        data_dir: str | Path,
        durability: Durability | str = Durability.FSYNC,
        fsync_interval_ms: int = 100,
    ):
        self.root = Path(data_dir) / "sessions"
        self.root.mkdir(parents=True, exist_ok=True)
        self.durability = Durability.parse(durability)
        self._wal: dict[str, tuple[int, BinaryIO]] = {}  # session id -> (base version, file)
        # Held to close a log (or swap it for a new one) and by the flusher around its fsync,
        # so the flusher never fsyncs a closed (or reused) file descriptor. Appends need no lock.
        self._files_lock = threading.Lock()
        self._flusher = (
            Flusher(fsync_interval_ms / 1000, self._fsync_log)
            if self.durability is Durability.BATCH
            else None
        )

    @property
    def acknowledges_durably(self) -> bool:
        """Whether a patch is on stable storage when append() returns."""
        return self.durability is Durability.FSYNC

    # -- writing ----------------------------------------------------------------------------
    def create(self, state: SessionState) -> None:
        """Persist a new session: its folder appears, complete, in one rename.

        A failure anywhere leaves no session folder behind: the caller answers an error, so a
        restart must not bring the session back. Before the rename a dot-folder is left at worst
        (recovery removes those); after it, the folder is moved aside into one again.
        """
        tmp = self.root / f".creating-{state.session_id}-{time.time_ns()}"
        final = self.root / state.session_id
        try:
            tmp.mkdir()
            write_snapshot(tmp, capture(state))
            (tmp / wal_name(state.version)).touch()
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            fsync_dir(self.root)
            self._open_wal(state.session_id, state.version)
        except BaseException:
            self.close_session(state.session_id)
            self._discard(final, state.session_id)
            raise

    def _discard(self, folder: Path, session_id: str) -> None:
        """Move a session folder aside in one rename (recovery skips dot-folders); remove it."""
        trash = self.root / f".deleted-{session_id}-{time.time_ns()}"
        try:
            os.replace(folder, trash)
            fsync_dir(self.root)
        except OSError as e:
            logger.error("session %s: could not remove a half-created folder: %s", session_id, e)
            return
        shutil.rmtree(trash, ignore_errors=True)

    def append(self, session_id: str, patch: session_pb2.CommittedPatch) -> int:
        """Append one record, written to the OS and fsynced as the durability setting says;
        returns the offset to roll back to. On failure nothing of the record stays in the log
        (or LogRepairFailed says the log could not be repaired)."""
        _, f = self._wal[session_id]
        record = encode_record(patch)
        mark = f.tell()
        try:
            f.write(record)
            f.flush()
            if self.durability is Durability.FSYNC:
                os.fsync(f.fileno())
        except BaseException:
            self.rollback(session_id, mark)
            raise
        if self._flusher is not None:
            self._flusher.mark(session_id)
        return mark

    def _fsync_log(self, session_id: str) -> None:
        """The flusher's round for one session: fsync its current log, if it still has one."""
        with self._files_lock:
            entry = self._wal.get(session_id)
            if entry is not None:
                os.fsync(entry[1].fileno())

    def rollback(self, session_id: str, mark: int) -> None:
        """Cut the log back to `mark` (a record whose commit then failed must not be replayed);
        LogRepairFailed when that fails."""
        _, f = self._wal[session_id]
        try:
            f.seek(mark)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            raise LogRepairFailed(f"could not cut the log back to byte {mark}: {e}") from e

    def snapshot(self, state: SessionState, replies: Iterable[StoredReply] = ()) -> None:
        """begin_snapshot and finish_snapshot in one call."""
        self.finish_snapshot(self.begin_snapshot(state, replies))

    def begin_snapshot(
        self, state: SessionState, replies: Iterable[StoredReply] = ()
    ) -> PendingSnapshot:
        """Under the session's lock: copy the live rows, header and replies (the caller bounds
        them), and make wal-<version> the session's log, so that the patches after this version
        land there while the snapshot is written.

        On OSError the session goes on appending to its current log. The new log file is
        removed again first: left beside the old log, it would hide the old log's records past
        this version. LogRepairFailed when that removal fails too.
        """
        pending = capture(state, replies)
        folder = self.root / state.session_id
        wal = folder / wal_name(state.version)
        try:
            wal.touch()
            fsync_dir(folder)
            self._open_wal(state.session_id, state.version)
        except OSError:
            self._remove_unused_log(wal)
            raise
        return pending

    def finish_snapshot(self, pending: PendingSnapshot) -> None:
        """Off the lock: write the snapshot durably, then drop the files it makes redundant.
        On OSError nothing is lost: recovery replays the older snapshot and both logs."""
        folder = self.root / pending.session_id
        write_snapshot(folder, pending)
        for p in folder.iterdir():
            v = version_of(p)
            if v is not None and v < pending.version:
                try:
                    p.unlink()
                except OSError as e:  # harmless: recovery skips what the snapshot holds
                    logger.warning(
                        "session %s v%d: could not remove %s: %s",
                        pending.session_id, pending.version, p.name, e,
                    )  # fmt: skip
        logger.info("session %s v%d: snapshot written", pending.session_id, pending.version)

    def _remove_unused_log(self, wal: Path) -> None:
        try:
            wal.unlink(missing_ok=True)
            fsync_dir(wal.parent)
        except OSError as e:
            raise LogRepairFailed(f"could not remove the unused log {wal.name}: {e}") from e

    def delete(self, session_id: str) -> None:
        """Move the folder aside in one rename (a restart ignores it), then remove it."""
        folder = self.root / session_id
        trash = self.root / f".deleted-{session_id}-{time.time_ns()}"
        os.replace(folder, trash)  # if this fails the session is untouched, log still open
        self.close_session(session_id)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def close(self) -> None:
        if self._flusher is not None:
            self._flusher.close()  # a last round: everything acknowledged reaches the disk
        for session_id in list(self._wal):
            self.close_session(session_id)

    def wal_bytes(self, session_id: str) -> int:
        return self._wal[session_id][1].tell()

    def _open_wal(self, session_id: str, base_version: int) -> None:
        """Make wal-<base_version> the session's log. The new file is open before the old one
        is closed: when opening fails, the session keeps the log it had."""
        path = self.root / session_id / wal_name(base_version)
        f = open(path, "r+b")  # noqa: SIM115 - kept open
        try:
            f.seek(0, os.SEEK_END)
        except BaseException:
            f.close()
            raise
        self.close_session(session_id)
        with self._files_lock:
            self._wal[session_id] = (base_version, f)

    def close_session(self, session_id: str) -> None:
        """Close the session's log; in the batch setting, fsync it first."""
        with self._files_lock:
            entry = self._wal.pop(session_id, None)
            if entry is None:
                return
            try:
                if self.durability is Durability.BATCH:
                    os.fsync(entry[1].fileno())
            except OSError as e:
                logger.error("session %s: fsync of the log on close failed: %s", session_id, e)
            finally:
                entry[1].close()

    # -- recovery ---------------------------------------------------------------------------
    def recover_all(self) -> list[Recovered]:
        """Every persisted session at its last acknowledged version, the log left open."""
        out = []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith("."):  # half-created or half-deleted: never acknowledged
                shutil.rmtree(folder, ignore_errors=True)
                continue
            out.append(self._recover(folder))
        return out

    def _recover(self, folder: Path) -> Recovered:
        snapshots = versioned(folder, "snapshot")
        if not snapshots:
            raise CorruptStore(f"{folder}: no snapshot")
        state, replies = load_snapshot(snapshots[-1][1])
        # wal-<b> holds the versions after b up to the next log's b: skip the logs the
        # snapshot covers whole (a crash can leave them behind), read the rest in order.
        wals = versioned(folder, "wal")
        needed = [
            w for i, w in enumerate(wals) if i + 1 == len(wals) or wals[i + 1][0] > state.version
        ]
        lenient = self.durability is not Durability.FSYNC
        replayed: list[Replayed] = []
        for i, (_, wal) in enumerate(needed):
            last = i + 1 == len(needed)
            records, cut = read_records(wal, last=last, lenient=lenient)
            for patch in records:
                if patch.version <= state.version:
                    continue  # already in the snapshot
                replayed.append(_replay(state, patch, wal))
            if cut and not last:  # lenient: what follows a gap cannot be replayed
                for _, later in needed[i + 1 :]:
                    logger.warning("%s: dropped, it follows damage in %s", later, wal.name)
                    later.unlink()
                needed = needed[: i + 1]
                break
        base = needed[-1][0] if needed else state.version
        if not needed:
            (folder / wal_name(base)).touch()
        self._open_wal(state.session_id, base)
        logger.info(
            "session %s v%d: recovered (snapshot v%d + %d log records)",
            state.session_id,
            state.version,
            state.version - len(replayed),
            len(replayed),
        )
        return Recovered(state, replayed, replies)


def _replay(state: SessionState, patch: session_pb2.CommittedPatch, wal: Path) -> Replayed:
    if patch.version != state.version + 1:
        raise CorruptStore(f"{wal}: v{patch.version} after v{state.version}")
    digest = chain_digest(state.digest, patch.version, list(patch.ops))
    if digest != patch.digest:
        raise CorruptStore(f"{wal}: digest chain broken at v{patch.version}")
    s = apply_ops(state, ops_from_pb(patch.ops), patch.version, digest)
    return Replayed(patch, s.new_row_count, s.appended, s.merged, s.evicted)
