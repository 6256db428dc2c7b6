"""Durable sessions: a write-ahead log of committed patches plus periodic snapshots.

Layout under the data dir, one folder per session:
  sessions/<id>/snapshot-<version>.safetensors  canonical keys + values, SnapshotHeader and the
                                                recent request ids' replies in metadata
  sessions/<id>/wal-<version>.log               patches after that version, one record each
A record is <u32 length><u32 crc32><CommittedPatch bytes>, written before the patch is
acknowledged and fsynced as the durability setting says (durability.py: before the reply, by a
background flusher, or never). Recovery loads the newest readable snapshot and replays every
later record through the same apply_ops a replica uses, checking the digest chain. A torn last
record (the process died while writing it) was never acknowledged and is cut off; damage
anywhere else refuses to start, except past the last fsync in the batch and none settings.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from cache_authority.durability import Durability, Flusher
from cache_authority.ops import chain_digest, ops_from_pb
from cache_authority.rows import SessionState
from cache_authority.snapshot import state_from_parts, state_to_header
from cache_authority.state import apply_ops
from positronic.v1 import cache_authority_pb2, session_pb2

logger = logging.getLogger(__name__)

_RECORD = struct.Struct("<II")  # payload length, crc32 of the payload


class CorruptStore(RuntimeError):
    """Persisted state that cannot be trusted: refusing to start beats serving wrong rows."""


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


@dataclass(frozen=True)
class StoredReply:
    """The reply to a committed patch, kept with the snapshot so that a retry of its request id
    after a restart gets it back (the log after the snapshot no longer holds that patch)."""

    request_id: str
    version: int
    digest: bytes
    row_count: int


@dataclass
class Recovered:
    """A session read back from disk: its snapshot's stored replies (oldest first) and the log
    records replayed on top of the snapshot."""

    state: SessionState
    replayed: list[Replayed]
    replies: list[StoredReply] = field(default_factory=list)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class SessionStore:
    """Persistence for every session of one authority. Callers hold the session's lock."""

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
        """Persist a new session: its folder appears, complete, in one rename."""
        tmp = self.root / f".creating-{state.session_id}-{time.time_ns()}"
        tmp.mkdir()
        self._write_snapshot(tmp, state)
        (tmp / _wal_name(state.version)).touch()
        final = self.root / state.session_id
        os.replace(tmp, final)
        _fsync_dir(self.root)
        self._open_wal(state.session_id, state.version)

    def append(self, session_id: str, patch: session_pb2.CommittedPatch) -> int:
        """Append one record, written to the OS and fsynced as the durability setting says;
        returns the offset to roll back to. On failure nothing of the record stays in the log
        (or LogRepairFailed says the log could not be repaired)."""
        _, f = self._wal[session_id]
        payload = patch.SerializeToString(deterministic=True)
        mark = f.tell()
        try:
            f.write(_RECORD.pack(len(payload), zlib.crc32(payload)) + payload)
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
        """Write a snapshot at the state's version with the replies to recent request ids (the
        caller bounds them), start a new log after it, drop older files.

        On OSError the session goes on appending to its current log, which recovery replays on
        top of whichever snapshot it finds. The new log file is removed again first: left beside
        the old log, it would make the old log's torn tail (a crash mid-write) look like damage.
        LogRepairFailed when that removal fails too.
        """
        folder = self.root / state.session_id
        self._write_snapshot(folder, state, replies)
        wal = folder / _wal_name(state.version)
        try:
            wal.touch()
            _fsync_dir(folder)
            self._open_wal(state.session_id, state.version)
        except OSError:
            self._remove_unused_log(wal)
            raise
        for p in folder.iterdir():
            v = _version_of(p)
            if v is not None and v < state.version:
                try:
                    p.unlink()
                except OSError as e:  # harmless: recovery skips what the snapshot holds
                    logger.warning(
                        "session %s v%d: could not remove %s: %s",
                        state.session_id, state.version, p.name, e,
                    )  # fmt: skip
        logger.info("session %s v%d: snapshot written", state.session_id, state.version)

    def _remove_unused_log(self, wal: Path) -> None:
        try:
            wal.unlink(missing_ok=True)
            _fsync_dir(wal.parent)
        except OSError as e:
            raise LogRepairFailed(f"could not remove the unused log {wal.name}: {e}") from e

    def delete(self, session_id: str) -> None:
        """Move the folder aside in one rename (a restart ignores it), then remove it."""
        folder = self.root / session_id
        trash = self.root / f".deleted-{session_id}-{time.time_ns()}"
        os.replace(folder, trash)  # if this fails the session is untouched, log still open
        self.close_session(session_id)
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def close(self) -> None:
        if self._flusher is not None:
            self._flusher.close()  # a last round: everything acknowledged reaches the disk
        for session_id in list(self._wal):
            self.close_session(session_id)

    def wal_bytes(self, session_id: str) -> int:
        return self._wal[session_id][1].tell()

    def _write_snapshot(
        self, folder: Path, state: SessionState, replies: Iterable[StoredReply] = ()
    ) -> None:
        header = state_to_header(state)
        stored = [[r.request_id, r.version, r.digest.hex(), r.row_count] for r in replies]
        blob = save_safetensors(
            {
                "canonical_keys": state.live_canonical_keys().contiguous(),
                "values": state.live_values().contiguous(),
            },
            metadata={
                "header": base64.b64encode(header.SerializeToString()).decode(),
                "replies": json.dumps(stored),
            },
        )
        _write_durably(folder / f"snapshot-{state.version:012d}.safetensors", blob)

    def _open_wal(self, session_id: str, base_version: int) -> None:
        """Make wal-<base_version> the session's log. The new file is open before the old one
        is closed: when opening fails, the session keeps the log it had."""
        path = self.root / session_id / _wal_name(base_version)
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
        snapshots = _versioned(folder, "snapshot")
        if not snapshots:
            raise CorruptStore(f"{folder}: no snapshot")
        state, replies = _load_snapshot(snapshots[-1][1])
        replayed = []
        wals = _versioned(folder, "wal")
        for i, (_, wal) in enumerate(wals):
            lenient = self.durability is not Durability.FSYNC
            for patch in _read_records(wal, last=i == len(wals) - 1, lenient=lenient):
                if patch.version <= state.version:
                    continue  # already in the snapshot
                if patch.version != state.version + 1:
                    raise CorruptStore(f"{wal}: v{patch.version} after v{state.version}")
                digest = chain_digest(state.digest, patch.version, list(patch.ops))
                if digest != patch.digest:
                    raise CorruptStore(f"{wal}: digest chain broken at v{patch.version}")
                s = apply_ops(state, ops_from_pb(patch.ops), patch.version, digest)
                replayed.append(Replayed(patch, s.new_row_count, s.appended, s.merged, s.evicted))
        base = wals[-1][0] if wals else state.version
        if not wals:
            (folder / _wal_name(base)).touch()
        self._open_wal(state.session_id, base)
        logger.info(
            "session %s v%d: recovered (snapshot v%d + %d log records)",
            state.session_id,
            state.version,
            state.version - len(replayed),
            len(replayed),
        )
        return Recovered(state, replayed, replies)


def _wal_name(version: int) -> str:
    return f"wal-{version:012d}.log"


def _version_of(path: Path) -> int | None:
    """The version in a snapshot or log file name; None for anything else (e.g. *.tmp)."""
    stem, _, suffix = path.name.partition(".")
    prefix, _, number = stem.partition("-")
    if prefix in ("wal", "snapshot") and number.isdigit() and suffix in ("log", "safetensors"):
        return int(number)
    return None


def _versioned(folder: Path, prefix: str) -> list[tuple[int, Path]]:
    """(version, path) of the folder's snapshot or log files, oldest first."""
    found = []
    for p in folder.glob(f"{prefix}-*"):
        v = _version_of(p)
        if v is not None:
            found.append((v, p))
    return sorted(found)


def _load_snapshot(path: Path) -> tuple[SessionState, list[StoredReply]]:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        header = cache_authority_pb2.SnapshotHeader.FromString(base64.b64decode(metadata["header"]))
        state = state_from_parts(header, f.get_tensor("canonical_keys"), f.get_tensor("values"))
    # Snapshots written before replies were kept have none.
    replies = [
        StoredReply(rid, version, bytes.fromhex(digest), rows)
        for rid, version, digest, rows in json.loads(metadata.get("replies", "[]"))
    ]
    return state, replies


def _read_records(path: Path, last: bool, lenient: bool = False):
    """Yield the CommittedPatch records of one log; cut a torn tail off the last log. `lenient`
    (batch and none durability): damage in the last log is cut off from its first bad record."""
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        end = offset + _RECORD.size
        torn = end > len(data)
        if not torn:
            length, crc = _RECORD.unpack_from(data, offset)
            torn = end + length > len(data)
            if not torn and zlib.crc32(data[end : end + length]) != crc:
                # A complete record with a bad checksum is torn only if nothing follows it.
                torn = end + length == len(data) or (last and lenient)
                if not torn:
                    raise CorruptStore(f"{path}: bad record at byte {offset}")
        if torn:
            if not last:
                raise CorruptStore(f"{path}: torn record at byte {offset} before a later log")
            logger.warning(
                "%s: discarding %d bytes from byte %d: a torn last record (never acknowledged)%s",
                path,
                len(data) - offset,
                offset,
                ", or damage past the last fsync" if lenient else "",
            )
            with open(path, "r+b") as f:
                f.truncate(offset)
                os.fsync(f.fileno())
            return
        yield session_pb2.CommittedPatch.FromString(data[end : end + length])
        offset = end + length
