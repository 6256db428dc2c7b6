"""Proto <-> domain conversions for sessions: geometry, budget, session info and the mirror.

Every *_from_pb raises ValueError on malformed input; callers map it to INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cache_authority.rows import KV_DTYPES, Budget, Geometry, RowMeta, SessionState
from positronic import codec
from positronic.rope import Rope
from positronic.v1 import session_pb2


def geometry_from_pb(pb: session_pb2.ModelGeometry) -> Geometry:
    """ModelGeometry -> Geometry; ValueError names the first bad field."""
    dtype = codec.dtype_from_wire(pb.dtype)  # CodecError is a ValueError
    if dtype not in KV_DTYPES:
        raise ValueError(f"KV dtype must be float32, float16 or bfloat16, not {dtype}")
    inv_freq = torch.tensor(list(pb.rope.inv_freq), dtype=torch.float32)
    if pb.head_dim > 0 and inv_freq.numel() != pb.head_dim // 2:
        raise ValueError(
            f"rope.inv_freq has {inv_freq.numel()} entries; head_dim {pb.head_dim} needs "
            f"{pb.head_dim // 2}"
        )
    return Geometry(
        num_layers=pb.num_layers,
        num_kv_heads=pb.num_kv_heads,
        head_dim=pb.head_dim,
        dtype=dtype,
        # attention_scaling 0 means "not set": HF's default of 1.
        rope=Rope(inv_freq=inv_freq, attention_scaling=pb.rope.attention_scaling or 1.0),
        vocab_size=pb.vocab_size,
        model_fingerprint=pb.model_fingerprint,
        max_position_embeddings=pb.max_position_embeddings,
        rope_type=pb.rope.rope_type,
        rope_theta=pb.rope.rope_theta,
        rope_scaling=tuple(sorted(pb.rope.scaling.items())),
    )


def geometry_to_pb(g: Geometry) -> session_pb2.ModelGeometry:
    return session_pb2.ModelGeometry(
        num_layers=g.num_layers,
        num_kv_heads=g.num_kv_heads,
        head_dim=g.head_dim,
        dtype=codec.dtype_to_wire(g.dtype),
        rope=session_pb2.RopeParameters(
            rope_type=g.rope_type,
            rope_theta=g.rope_theta,
            scaling=dict(g.rope_scaling),
            inv_freq=g.rope.inv_freq.tolist(),
            attention_scaling=g.rope.attention_scaling,
        ),
        vocab_size=g.vocab_size,
        model_fingerprint=g.model_fingerprint,
        max_position_embeddings=g.max_position_embeddings,
    )


def budget_from_pb(pb: session_pb2.Budget) -> Budget:
    return Budget(target_rows=pb.target_rows, hard_max_rows=pb.hard_max_rows)


def budget_to_pb(b: Budget) -> session_pb2.Budget:
    return session_pb2.Budget(target_rows=b.target_rows, hard_max_rows=b.hard_max_rows)


def session_info_to_pb(state: SessionState) -> session_pb2.SessionInfo:
    return session_pb2.SessionInfo(
        session_id=state.session_id,
        geometry=geometry_to_pb(state.geometry),
        budget=budget_to_pb(state.budget),
        version=state.version,
        digest=state.digest,
        row_count=state.row_count,
        seed_brightness=state.seed_brightness,
        created_unix_ns=state.created_unix_ns,
        position_offset=state.position_offset,
    )


def mirror_to_pb(state: SessionState) -> list[session_pb2.MirrorEntry]:
    """One MirrorEntry per live row, in row order."""
    tokens = state.live_token_ids()
    bright = state.live_brightness()
    return [
        session_pb2.MirrorEntry(
            position=i,
            ledger_id=m.ledger_id,
            token_id=tokens[i],
            piece=m.piece,
            brightness=bright[i],
            source=m.source,  # type: ignore[arg-type]
            replaced_ledger_ids=list(m.replaced_ledger_ids),
            replaced_token_ids=list(m.replaced_token_ids),
            origin_position=m.origin_position,
            created_version=m.created_version,
            replaced_text=m.replaced_text,
        )
        for i, m in enumerate(state.meta)
    ]


def rows_from_mirror(
    entries: Sequence[session_pb2.MirrorEntry],
) -> tuple[list[int], list[int], list[float], list[RowMeta]]:
    """Token ids, origin positions, brightness and RowMeta of each row, from the mirror."""
    for i, e in enumerate(entries):
        if e.position != i:
            raise ValueError(f"mirror entry {i} has position {e.position}")
    metas = [
        RowMeta(
            ledger_id=e.ledger_id,
            piece=e.piece,
            source=e.source,
            origin_position=e.origin_position,
            created_version=e.created_version,
            replaced_ledger_ids=tuple(e.replaced_ledger_ids),
            replaced_token_ids=tuple(e.replaced_token_ids),
            replaced_text=e.replaced_text,
        )
        for e in entries
    ]
    return (
        [e.token_id for e in entries],
        [e.origin_position for e in entries],
        [e.brightness for e in entries],
        metas,
    )
