"""Snapshot files of a persisted session: what a snapshot holds, copied out of the live state,
written durably (temporary name, fsync, rename) and read back."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from cache_authority.rows import SessionState
from cache_authority.snapshot import state_from_parts, state_to_header
from cache_authority.wal import snapshot_name
from positronic.v1 import cache_authority_pb2


@dataclass(frozen=True)
class StoredReply:
    """The reply to a committed patch, kept with the snapshot so that a retry of its request id
    after a restart gets it back (the log after the snapshot no longer holds that patch)."""

    request_id: str
    version: int
    digest: bytes
    row_count: int
    fingerprint: bytes = b""  # ops.patch_fingerprint of the request (empty in older snapshots)


@dataclass(frozen=True)
class PendingSnapshot:
    """What a snapshot holds, copied out of the live state: it can be written off the lock."""

    session_id: str
    version: int
    header: cache_authority_pb2.SnapshotHeader
    canonical_keys: torch.Tensor  # [L, H, N, D], a private copy
    values: torch.Tensor  # [L, H, N, D], a private copy
    replies: tuple[StoredReply, ...] = ()


def capture(state: SessionState, replies: Iterable[StoredReply] = ()) -> PendingSnapshot:
    """Copy the live rows, the header and the replies: O(rows) of memory copies, no disk."""
    return PendingSnapshot(
        state.session_id,
        state.version,
        state_to_header(state),
        state.live_canonical_keys().clone(memory_format=torch.contiguous_format).cpu(),
        state.live_values().clone(memory_format=torch.contiguous_format).cpu(),
        tuple(replies),
    )


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_snapshot(folder: Path, snap: PendingSnapshot) -> None:
    stored = [
        [r.request_id, r.version, r.digest.hex(), r.row_count, r.fingerprint.hex()]
        for r in snap.replies
    ]
    blob = save_safetensors(
        {"canonical_keys": snap.canonical_keys, "values": snap.values},
        metadata={
            "header": base64.b64encode(snap.header.SerializeToString()).decode(),
            "replies": json.dumps(stored),
        },
    )
    write_durably(folder / snapshot_name(snap.version), blob)


def load_snapshot(path: Path) -> tuple[SessionState, list[StoredReply]]:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        header = cache_authority_pb2.SnapshotHeader.FromString(base64.b64decode(metadata["header"]))
        state = state_from_parts(header, f.get_tensor("canonical_keys"), f.get_tensor("values"))
    # Snapshots written before replies were kept have none.
    replies = [
        StoredReply(
            rid, version, bytes.fromhex(digest), rows, bytes.fromhex(rest[0] if rest else "")
        )
        for rid, version, digest, rows, *rest in json.loads(metadata.get("replies", "[]"))
    ]
    return state, replies
