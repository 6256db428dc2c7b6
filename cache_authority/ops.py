"""Patch ops as domain objects, their proto conversions, errors, and the digest chain."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from positronic import codec
from positronic.v1 import session_pb2


class Status(enum.Enum):
    """Why a patch was refused; the servicer maps each to the gRPC code of the same name."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    ABORTED = "ABORTED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    # The write-ahead log could not be written (disk full, I/O error): nothing was committed.
    UNAVAILABLE = "UNAVAILABLE"
    # The client cancelled its request stream (or it broke) before its end: nothing was committed.
    CANCELLED = "CANCELLED"


class PatchError(Exception):
    """A refused patch (or session request). Nothing was changed."""

    def __init__(self, status: Status, message: str, current_version: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.current_version = current_version


@dataclass(frozen=True)
class AppendOp:
    position: int
    token_ids: tuple[int, ...]
    keys: torch.Tensor  # [L, H, N, D]
    values: torch.Tensor  # [L, H, N, D]
    pieces: tuple[str, ...] = ()
    brightness: tuple[float, ...] = ()
    source: Any = session_pb2.TOKEN_SOURCE_GENERATED


@dataclass(frozen=True)
class ReplacePairOp:
    position: int
    expected_token_ids: tuple[int, ...]
    token_id: int
    keys: torch.Tensor  # [L, H, 1, D]
    values: torch.Tensor  # [L, H, 1, D]
    piece: str = ""
    brightness: float = 0.0
    replaced_text: str = ""  # what the merged row stands for, kept in its MirrorEntry


@dataclass(frozen=True)
class EvictOp:
    position: int
    expected_token_id: int


@dataclass(frozen=True)
class SetBrightnessOp:
    expected_row_count: int
    # [N] float32. A tensor, not a tuple: it comes every tick with one value per row, and
    # numpy reads the protobuf field in one copy where a tuple costs a Python float per row.
    brightness: torch.Tensor


Op = AppendOp | ReplacePairOp | EvictOp | SetBrightnessOp


MAX_DIM = 1 << 31  # no session dimension comes near; larger ones overflow torch's allocator


def _kv_from_pb(kv, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("keys", kv.keys), ("values", kv.values)):
        if len(t.shape) != 4 or any(not 0 <= d < MAX_DIM for d in t.shape):
            shape = list(t.shape)[:8]
            raise PatchError(
                Status.INVALID_ARGUMENT, f"{what}: {name} shape {shape} is not [L, H, N, D]"
            )
    try:
        return codec.decode(kv.keys), codec.decode(kv.values)
    except codec.CodecError as e:
        raise PatchError(Status.INVALID_ARGUMENT, f"{what}: {e}") from None


def op_from_pb(msg: session_pb2.PatchOp, index: int = 0) -> Op:
    """Proto -> domain op. Malformed tensors raise PatchError(INVALID_ARGUMENT)."""
    kind = msg.WhichOneof("op")
    what = f"op {index} ({kind})"
    if kind == "append":
        a = msg.append
        keys, values = _kv_from_pb(a.kv, what)
        source = a.source or session_pb2.TOKEN_SOURCE_GENERATED
        if source not in session_pb2.TokenSource.values():
            raise PatchError(Status.INVALID_ARGUMENT, f"{what}: unknown source {source}")
        return AppendOp(
            position=a.position,
            token_ids=tuple(a.token_ids),
            keys=keys,
            values=values,
            pieces=tuple(a.pieces),
            brightness=tuple(a.brightness),
            source=source,
        )
    if kind == "replace_pair":
        r = msg.replace_pair
        keys, values = _kv_from_pb(r.kv, what)
        return ReplacePairOp(
            position=r.position,
            expected_token_ids=tuple(r.expected_token_ids),
            token_id=r.token_id,
            keys=keys,
            values=values,
            piece=r.piece,
            brightness=r.brightness,
            replaced_text=r.replaced_text,
        )
    if kind == "evict":
        return EvictOp(position=msg.evict.position, expected_token_id=msg.evict.expected_token_id)
    if kind == "set_brightness":
        s = msg.set_brightness
        values = torch.from_numpy(np.array(s.brightness, dtype=np.float32))
        return SetBrightnessOp(expected_row_count=s.expected_row_count, brightness=values)
    raise PatchError(Status.INVALID_ARGUMENT, f"op {index}: empty op")


def ops_from_pb(msgs) -> list[Op]:
    return [op_from_pb(m, i) for i, m in enumerate(msgs)]


def op_to_pb(op: Op) -> session_pb2.PatchOp:
    if isinstance(op, AppendOp):
        return session_pb2.PatchOp(
            append=session_pb2.AppendOp(
                position=op.position,
                token_ids=list(op.token_ids),
                kv=codec.encode_kv(op.keys, op.values),
                pieces=list(op.pieces),
                brightness=list(op.brightness),
                source=op.source,
            )
        )
    if isinstance(op, ReplacePairOp):
        return session_pb2.PatchOp(
            replace_pair=session_pb2.ReplacePairOp(
                position=op.position,
                expected_token_ids=list(op.expected_token_ids),
                token_id=op.token_id,
                kv=codec.encode_kv(op.keys, op.values),
                piece=op.piece,
                brightness=op.brightness,
                replaced_text=op.replaced_text,
            )
        )
    if isinstance(op, EvictOp):
        return session_pb2.PatchOp(
            evict=session_pb2.EvictOp(position=op.position, expected_token_id=op.expected_token_id)
        )
    return session_pb2.PatchOp(
        set_brightness=session_pb2.SetBrightnessOp(
            expected_row_count=op.expected_row_count, brightness=op.brightness.tolist()
        )
    )


GENESIS_DIGEST = hashlib.sha256(b"positronic.v1 session").digest()


def canonicalize(ops: Sequence[session_pb2.PatchOp]) -> None:
    """Drop the fields this authority does not know (a client built from a newer .proto), in
    place: they mean nothing here, so they are not committed, not hashed, not sent to replicas,
    and a retry that carries them is the same request. It also keeps the digest reproducible by a
    verifier whose protobuf library drops unknown fields when it parses (protobuf.js does)."""
    for op in ops:
        op.DiscardUnknownFields()


def op_bodies(ops: Sequence[session_pb2.PatchOp]) -> list[bytes]:
    """Each op's deterministic serialization, what the fingerprint and the digest hash: the
    engine serializes a patch once for both (its K/V are most of its bytes)."""
    return [op.SerializeToString(deterministic=True) for op in ops]


def patch_fingerprint(
    expected_version: int, ops: Sequence[session_pb2.PatchOp], bodies: list[bytes] | None = None
) -> bytes:
    """What a request id promises stays the same on a retry: the version and the ops
    (`bodies`: their op_bodies, when the caller has them already)."""
    h = hashlib.sha256(b"positronic.v1 request")
    h.update(expected_version.to_bytes(8, "little", signed=True))
    _hash_bodies(h, op_bodies(ops) if bodies is None else bodies)
    return h.digest()


def chain_digest(
    previous: bytes,
    version: int,
    ops: Sequence[session_pb2.PatchOp],
    bodies: list[bytes] | None = None,
) -> bytes:
    """digest_v = sha256(digest_{v-1} || int64_le(v) || for each op in order: uint64_le(len) ||
    the op's deterministic serialization); docs/protocol.md works an example. `bodies`: the
    ops' op_bodies, when the caller has them already."""
    h = hashlib.sha256()
    h.update(previous)
    h.update(version.to_bytes(8, "little", signed=True))
    _hash_bodies(h, op_bodies(ops) if bodies is None else bodies)
    return h.digest()


def _hash_bodies(h, bodies: list[bytes]) -> None:
    """For each op in order: uint64_le(len) || its deterministic serialization."""
    for body in bodies:
        h.update(len(body).to_bytes(8, "little"))
        h.update(body)
