"""The files of a persisted session: names, the write-ahead log's record format, and reading it.

  snapshot-<version>.safetensors  the session at <version>
  wal-<version>.log               the patches after <version>, up to the next log's version
A record is <u32 length><u32 crc32><CommittedPatch bytes>.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

from positronic.v1 import session_pb2

logger = logging.getLogger(__name__)

RECORD = struct.Struct("<II")  # payload length, crc32 of the payload


class CorruptStore(RuntimeError):
    """Persisted state that cannot be trusted: refusing to start beats serving wrong rows."""


def encode_record(patch: session_pb2.CommittedPatch) -> bytes:
    payload = patch.SerializeToString(deterministic=True)
    return RECORD.pack(len(payload), zlib.crc32(payload)) + payload


def wal_name(version: int) -> str:
    return f"wal-{version:012d}.log"


def snapshot_name(version: int) -> str:
    return f"snapshot-{version:012d}.safetensors"


def version_of(path: Path) -> int | None:
    """The version in a snapshot or log file name; None for anything else (e.g. *.tmp)."""
    stem, _, suffix = path.name.partition(".")
    prefix, _, number = stem.partition("-")
    if prefix in ("wal", "snapshot") and number.isdigit() and suffix in ("log", "safetensors"):
        return int(number)
    return None


def versioned(folder: Path, prefix: str) -> list[tuple[int, Path]]:
    """(version, path) of the folder's snapshot or log files, oldest first."""
    found = []
    for p in folder.glob(f"{prefix}-*"):
        v = version_of(p)
        if v is not None:
            found.append((v, p))
    return sorted(found)


def read_records(
    path: Path, last: bool, lenient: bool = False
) -> tuple[list[session_pb2.CommittedPatch], bool]:
    """The CommittedPatch records of one log, and whether it was cut short.

    A torn record at the end of the last log (the process died while writing it, so it was
    never acknowledged) is cut off the file. `lenient` (the batch and none durability settings,
    where a machine crash may leave damage past the last fsync): the first bad record of any
    log ends it, and the file is cut there. Any other damage raises CorruptStore.
    """
    data = path.read_bytes()
    records: list[session_pb2.CommittedPatch] = []
    offset = 0
    while offset < len(data):
        end = offset + RECORD.size
        torn = end > len(data)
        if not torn:
            length, crc = RECORD.unpack_from(data, offset)
            torn = end + length > len(data)
            if not torn and zlib.crc32(data[end : end + length]) != crc:
                # A complete record with a bad checksum is torn only if nothing follows it.
                torn = end + length == len(data) or lenient
                if not torn:
                    raise CorruptStore(f"{path}: bad record at byte {offset}")
        if torn:
            if not (last or lenient):
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
            return records, True
        records.append(session_pb2.CommittedPatch.FromString(data[end : end + length]))
        offset = end + length
    return records, False
