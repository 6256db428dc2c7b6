"""Both ends of a Sync stream, as plain functions over messages (no grpc here).

Sender: a committed patch becomes one or more PatchDelta messages (a large prime's ops are spread
so each message carries at most max_chunk_bytes of ops; one op is never cut, so an op larger than
that travels alone), and a snapshot becomes a header plus chunks of its tensor bytes.

Receiver: `SyncReceiver` turns those messages back into a SessionState, checking every version's
digest against the hash chain. A model worker's replica can use it as is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from cache_authority.ops import chain_digest, ops_from_pb
from cache_authority.rows import SessionState
from cache_authority.snapshot import state_from_snapshot
from cache_authority.state import replay_committed
from positronic import codec
from positronic.v1 import cache_authority_pb2 as ca
from positronic.v1 import session_pb2


def delta_messages(
    patch: session_pb2.CommittedPatch, max_chunk_bytes: int = codec.MAX_CHUNK_BYTES
) -> Iterator[ca.SyncResponse]:
    """The PatchDelta messages of one committed patch; the digest rides on the final part."""
    parts: list[list[session_pb2.PatchOp]] = [[]]
    size = 0
    for op in patch.ops:
        n = op.ByteSize()
        if parts[-1] and size + n > max_chunk_bytes:
            parts.append([])
            size = 0
        parts[-1].append(op)
        size += n
    for i, ops in enumerate(parts):
        final = i == len(parts) - 1
        part = session_pb2.CommittedPatch(
            version=patch.version,
            digest=patch.digest if final else b"",
            request_id=patch.request_id,
            ops=ops,
            committed_unix_ns=patch.committed_unix_ns,
        )
        yield ca.SyncResponse(delta=ca.PatchDelta(patch=part, final=final))


def snapshot_messages(
    header: ca.SnapshotHeader, data: bytes, max_chunk_bytes: int = codec.MAX_CHUNK_BYTES
) -> Iterator[ca.SyncResponse]:
    """A snapshot header, then its bytes in chunks (none when the session has no rows)."""
    yield ca.SyncResponse(snapshot_header=header)
    if not data:
        return
    offset = 0
    for chunk in codec.split_bytes(data, max_chunk_bytes):
        yield ca.SyncResponse(snapshot_chunk=ca.SnapshotChunk(offset=offset, data=chunk))
        offset += len(chunk)


class SyncError(ValueError):
    """A Sync stream that does not fit the replica: out of order, or a digest that disagrees."""


class SyncReceiver:
    """The replica side of Sync: feed it every SyncResponse; `state` follows the authority.

    A state rebuilt from a snapshot gets `rotated`, `device` and `scratch_slots` (see
    SessionState): model workers ask for rotated replicas on their device; deltas then apply in
    whatever mode the state has.
    """

    def __init__(
        self,
        state: SessionState | None = None,
        *,
        rotated: bool = False,
        device: torch.device | str = "cpu",
        scratch_slots: int = 0,
    ):
        self.state = state
        self.rotated, self.device, self.scratch_slots = rotated, device, scratch_slots
        self._header: ca.SnapshotHeader | None = None
        self._buffer = bytearray()
        self._ops: list[session_pb2.PatchOp] = []

    @property
    def version(self) -> int:
        return self.state.version if self.state is not None else 0

    def receive(self, msg: ca.SyncResponse) -> bool:
        """Take one message; True when `state` reached a new complete version."""
        kind = msg.WhichOneof("payload")
        if kind == "snapshot_header":
            self._header, self._buffer = msg.snapshot_header, bytearray()
            return self._finish_snapshot()
        if kind == "snapshot_chunk":
            if self._header is None or msg.snapshot_chunk.offset != len(self._buffer):
                raise SyncError("snapshot chunk out of order")
            self._buffer += msg.snapshot_chunk.data
            return self._finish_snapshot()
        if kind == "delta":
            return self._take_delta(msg.delta)
        raise SyncError("empty Sync message")

    def receive_all(self, msgs: Iterable[ca.SyncResponse]) -> SessionState | None:
        for msg in msgs:
            self.receive(msg)
        return self.state

    def _finish_snapshot(self) -> bool:
        assert self._header is not None
        if len(self._buffer) < self._header.total_bytes:
            return False
        try:
            self.state = state_from_snapshot(
                self._header,
                bytes(self._buffer),
                rotated=self.rotated,
                device=self.device,
                scratch_slots=self.scratch_slots,
            )
        except ValueError as e:
            raise SyncError(f"bad snapshot: {e}") from e
        self._header, self._buffer, self._ops = None, bytearray(), []
        return True

    def _take_delta(self, delta: ca.PatchDelta) -> bool:
        state = self.state
        if state is None or self._header is not None:
            raise SyncError("delta before any snapshot")
        patch = delta.patch
        if patch.version != state.version + 1:
            raise SyncError(f"delta for v{patch.version}, replica is at v{state.version}")
        self._ops.extend(patch.ops)
        if not delta.final:
            return False
        ops, self._ops = self._ops, []
        digest = chain_digest(state.digest, patch.version, ops)
        if digest != patch.digest:
            raise SyncError(f"session {state.session_id} v{patch.version}: digest mismatch")
        domain_ops = ops_from_pb(ops)
        try:
            # Verified: the authority validated exactly these ops against this very state.
            replay_committed(state, domain_ops, patch.version, digest)
        except Exception as e:  # half-written (no undo log): drop it; the owner resyncs
            self.state = None
            raise SyncError(
                f"session {state.session_id} v{patch.version}: does not apply ({e}); "
                "the replica must resync"
            ) from e
        return True
