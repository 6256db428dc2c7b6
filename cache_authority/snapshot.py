"""A session as one header plus tensor bytes: what Sync sends when the log no longer reaches back,
and what the authority writes to disk.

The snapshot carries canonical keys [L, H, N, D] then values [L, H, N, D] of the live rows plus
the mirror, and the session's position_offset: the rebuilt state puts row i back in slot
position_offset + i, so it makes the same slot moves as the authority from then on. Rotated keys
are never sent: a replica derives them from the canonical keys and each row's origin position
with the same single rotation its patches use (DESIGN.md invariant 5).
"""

from __future__ import annotations

import torch

from cache_authority import slots
from cache_authority.convert import (
    budget_from_pb,
    geometry_from_pb,
    mirror_to_pb,
    rows_from_mirror,
    session_info_to_pb,
)
from cache_authority.rows import SessionState
from cache_authority.stage import check_blades
from positronic import codec
from positronic.v1 import cache_authority_pb2, tensor_pb2


def state_to_header(state: SessionState) -> cache_authority_pb2.SnapshotHeader:
    """The header of a snapshot of `state` (specs without data)."""
    n = state.row_count
    wire = codec.dtype_to_wire(state.geometry.dtype)
    shape = list(state.geometry.kv_shape(n))
    specs = [tensor_pb2.Tensor(dtype=wire, shape=shape) for _ in range(2)]
    return cache_authority_pb2.SnapshotHeader(
        session=session_info_to_pb(state),
        mirror=mirror_to_pb(state),
        tensor_specs=specs,
        total_bytes=2 * codec.tensor_nbytes(state.geometry.dtype, shape),
        next_ledger_id=state.next_ledger_id,
    )


def state_to_snapshot(state: SessionState) -> tuple[cache_authority_pb2.SnapshotHeader, bytes]:
    """(header, canonical key bytes + value bytes) of the live rows."""
    header = state_to_header(state)
    data = b"".join(
        codec.encode(t).data for t in (state.live_canonical_keys(), state.live_values())
    )
    return header, data


def state_from_snapshot(
    header: cache_authority_pb2.SnapshotHeader,
    data: bytes,
    *,
    rotated: bool = False,
    device: torch.device | str = "cpu",
    scratch_slots: int = 0,
) -> SessionState:
    """Rebuild a session from a snapshot (a replica with `rotated=True`; see SessionState for
    the other arguments); ValueError when header and bytes do not fit together."""
    if len(header.tensor_specs) != 2:
        raise ValueError(f"snapshot has {len(header.tensor_specs)} tensor specs, expected 2")
    if len(data) != header.total_bytes:
        raise ValueError(f"snapshot has {len(data)} bytes, header says {header.total_bytes}")
    tensors, offset = [], 0
    for spec in header.tensor_specs:
        size = codec.tensor_nbytes(codec.dtype_from_wire(spec.dtype), spec.shape)
        msg = tensor_pb2.Tensor(
            dtype=spec.dtype, shape=spec.shape, data=data[offset : offset + size]
        )
        tensors.append(codec.decode(msg))
        offset += size
    if offset != len(data):
        raise ValueError(f"snapshot has {len(data) - offset} bytes beyond its tensors")
    return state_from_parts(
        header,
        tensors[0],
        tensors[1],
        rotated=rotated,
        device=device,
        scratch_slots=scratch_slots,
    )


def state_from_parts(
    header: cache_authority_pb2.SnapshotHeader,
    canonical_keys: torch.Tensor,
    values: torch.Tensor,
    *,
    rotated: bool = False,
    device: torch.device | str = "cpu",
    scratch_slots: int = 0,
) -> SessionState:
    """Rebuild a session from its header and its live tensors, canonical_keys/values [L,H,N,D]."""
    info = header.session
    geometry = geometry_from_pb(info.geometry)
    state = SessionState(
        session_id=info.session_id,
        geometry=geometry,
        budget=budget_from_pb(info.budget),
        seed_brightness=info.seed_brightness,
        version=info.version,
        digest=info.digest,
        next_ledger_id=header.next_ledger_id,
        created_unix_ns=info.created_unix_ns,
        rotated=rotated,
        device=device,
        scratch_slots=scratch_slots,
    )
    n = len(header.mirror)
    want = geometry.kv_shape(n)
    if n != info.row_count or n > state.budget.hard_max_rows:
        raise ValueError(f"snapshot mirror has {n} rows, session info says {info.row_count}")
    base = info.position_offset
    if not 0 <= base <= state.capacity - n:
        raise ValueError(f"position offset {base} does not fit {n} rows in {state.capacity} slots")
    for name, t in (("canonical keys", canonical_keys), ("values", values)):
        if t.dtype != geometry.dtype or tuple(t.shape) != want:
            raise ValueError(f"snapshot {name} are {t.dtype} {list(t.shape)}, need {list(want)}")
    tokens, origins, brightness, metas = rows_from_mirror(header.mirror)
    if any(m.ledger_id >= state.next_ledger_id for m in metas):
        raise ValueError("snapshot mirror holds a ledger id at or past next_ledger_id")
    live = slice(base, base + n)
    state.canonical_keys[:, :, live] = canonical_keys
    state.values[:, :, live] = values
    state.token_ids[live] = torch.tensor(tokens, dtype=torch.int64)
    state.origin_positions[live] = torch.tensor(origins, dtype=torch.int64)
    state.brightness[live] = torch.tensor(brightness, dtype=torch.float32)
    if state.rotated_keys is not None:
        state.rotated_keys[:, :, live] = slots.rotated_slots(state, base, n)
    state.meta = metas
    state.row_count = n
    state.position_offset = base
    check_blades(state)
    return state
