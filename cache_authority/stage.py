"""Stages two and three of a patch: build the new tail of the rows, then write it in.

stage_ops builds, in fresh tensors, the region from the lowest touched position to the end,
applying ops from the highest position down so every position the client sent (against the rows
at expected_version) still names the row it meant. commit_staged writes that tail into the
preallocated buffers and the mirror together, restoring the old tail if anything goes wrong.

Rows that moved are re-rotated from their canonical key by (index - origin) in one step
(DESIGN.md invariant 5); nothing accumulates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cache_authority.ops import AppendOp, EvictOp, Op, ReplacePairOp, SetBrightnessOp
from cache_authority.rows import RowMeta, SessionState
from positronic.rope import Rope, rerotate_from_canonical
from positronic.v1 import session_pb2


@dataclass
class _NewRows:
    token_ids: list[int]
    canonical_keys: torch.Tensor  # [L, H, N, D]
    values: torch.Tensor  # [L, H, N, D]
    origin_positions: list[int]
    brightness: list[float]
    meta: list[RowMeta]


@dataclass
class _Segment:
    """A run of rows in a staged tail: old rows [start, stop) or new rows given as tensors."""

    start: int = 0
    stop: int = 0
    new: _NewRows | None = None


@dataclass
class StagedPatch:
    """A validated patch turned into the new tail of the rows, ready to commit."""

    version: int
    start: int  # first row index the tail replaces
    old_row_count: int
    new_row_count: int
    keys: torch.Tensor  # [L, H, T, D]
    canonical_keys: torch.Tensor  # [L, H, T, D]
    values: torch.Tensor  # [L, H, T, D]
    token_ids: torch.Tensor  # [T]
    origin_positions: torch.Tensor  # [T]
    brightness_tail: torch.Tensor  # [T]
    brightness_head: torch.Tensor | None  # [start] when the head's brightness is rewritten
    meta: list[RowMeta]
    next_ledger_id: int
    appended: int = 0
    merged: int = 0
    evicted: int = 0


def _ledger_ids(state: SessionState, ops: Sequence[Op]) -> tuple[list[int], int]:
    """First ledger id of each op's new rows; new rows are numbered in the order ops were sent."""
    firsts, ledger = [], state.next_ledger_id
    for op in ops:
        firsts.append(ledger)
        if isinstance(op, AppendOp):
            ledger += len(op.token_ids)
        elif isinstance(op, ReplacePairOp):
            ledger += 1
    return firsts, ledger


def stage_ops(state: SessionState, ops: Sequence[Op], version: int) -> StagedPatch:
    """Build the patched tail without touching `state`. Ops must have passed validate_ops."""
    n = state.row_count
    brightness = state.brightness[:n].clone()
    for op in ops:
        if isinstance(op, SetBrightnessOp):
            brightness = torch.tensor(op.brightness, dtype=torch.float32)
    firsts, next_ledger = _ledger_ids(state, ops)
    edits = [(i, op) for i, op in enumerate(ops) if isinstance(op, ReplacePairOp | EvictOp)]
    start = min((op.position for _, op in edits), default=n)
    segments: list[_Segment] = [_Segment(start, n)] if start < n else []
    appended = 0
    for i, op in enumerate(ops):
        if not isinstance(op, AppendOp):
            continue
        count = len(op.token_ids)
        origins = [op.position + j for j in range(count)]
        metas = [
            RowMeta(
                ledger_id=firsts[i] + j,
                piece=op.pieces[j] if op.pieces else "",
                source=op.source,
                origin_position=origins[j],
                created_version=version,
            )
            for j in range(count)
        ]
        bright = list(op.brightness) if op.brightness else [state.seed_brightness] * count
        new = _NewRows(list(op.token_ids), op.keys, op.values, origins, bright, metas)
        segments.append(_Segment(new=new))
        appended += count
    merged = evicted = 0
    for i, op in sorted(edits, key=lambda e: e[1].position, reverse=True):
        if isinstance(op, ReplacePairOp):
            p = op.position
            a, b = state.meta[p], state.meta[p + 1]
            meta = RowMeta(
                ledger_id=firsts[i],
                piece=op.piece,
                source=session_pb2.TOKEN_SOURCE_MERGED,
                origin_position=p,
                created_version=version,
                replaced_ledger_ids=(a.ledger_id, b.ledger_id),
                replaced_token_ids=tuple(op.expected_token_ids),
            )
            new = _NewRows([op.token_id], op.keys, op.values, [p], [op.brightness], [meta])
            segments = _splice(segments, p, 2, _Segment(new=new))
            merged += 1
        else:
            segments = _splice(segments, op.position, 1, None)
            evicted += 1
    staged = _materialize(state, segments, start, brightness, version, next_ledger)
    staged.appended, staged.merged, staged.evicted = appended, merged, evicted
    return staged


def _splice(
    segments: list[_Segment], position: int, width: int, insert: _Segment | None
) -> list[_Segment]:
    """Replace old rows [position, position + width) (all inside old segments) by `insert`."""
    out: list[_Segment] = []
    for seg in segments:
        if seg.new is not None or seg.stop <= position or seg.start >= position + width:
            out.append(seg)
            continue
        if seg.start < position:
            out.append(_Segment(seg.start, position))
        if insert is not None:
            out.append(insert)
            insert = None
        if position + width < seg.stop:
            out.append(_Segment(position + width, seg.stop))
    return out


def _materialize(
    state: SessionState,
    segments: list[_Segment],
    start: int,
    brightness: torch.Tensor,
    version: int,
    next_ledger: int,
) -> StagedPatch:
    keys_c, vals, toks, origins, bright = [], [], [], [], []
    metas: list[RowMeta] = []
    for seg in segments:
        if seg.new is None:
            sl = slice(seg.start, seg.stop)
            keys_c.append(state.canonical_keys[:, :, sl])
            vals.append(state.values[:, :, sl])
            toks.append(state.token_ids[sl])
            origins.append(state.origin_positions[sl])
            bright.append(brightness[sl])
            metas.extend(state.meta[sl])
        else:
            nr = seg.new
            keys_c.append(nr.canonical_keys)
            vals.append(nr.values)
            toks.append(torch.tensor(nr.token_ids, dtype=torch.int64))
            origins.append(torch.tensor(nr.origin_positions, dtype=torch.int64))
            bright.append(torch.tensor(nr.brightness, dtype=torch.float32))
            metas.extend(nr.meta)
    g = state.geometry
    tail = len(metas)
    if tail:
        canonical = torch.cat(keys_c, dim=2)
        values = torch.cat(vals, dim=2)
        origin = torch.cat(origins)
    else:
        canonical = torch.zeros(g.kv_shape(0), dtype=g.dtype)
        values = canonical.clone()
        origin = torch.zeros(0, dtype=torch.int64)
    positions = torch.arange(start, start + tail, dtype=torch.int64)
    keys = rerotate_moved_rows(canonical, origin, positions, g.rope)
    return StagedPatch(
        version=version,
        start=start,
        old_row_count=state.row_count,
        new_row_count=start + tail,
        keys=keys,
        canonical_keys=canonical,
        values=values,
        token_ids=torch.cat(toks) if toks else torch.zeros(0, dtype=torch.int64),
        origin_positions=origin,
        brightness_tail=torch.cat(bright) if bright else torch.zeros(0),
        brightness_head=brightness[:start] if start else None,
        meta=metas,
        next_ledger_id=next_ledger,
    )


def rerotate_moved_rows(
    canonical: torch.Tensor, origin: torch.Tensor, positions: torch.Tensor, rope: Rope
) -> torch.Tensor:
    """Keys [L, H, N, D] of rows now at `positions` [N] whose canonical keys [L, H, N, D] were
    computed at `origin` [N]: a moved row is rotated from its canonical key in one step, a row
    still at its origin keeps it. Patches and snapshot rebuilds both come through here."""
    keys = canonical.clone()
    moved = positions != origin
    if bool(moved.any()):
        keys[:, :, moved] = rerotate_from_canonical(
            canonical[:, :, moved], origin[moved], positions[moved], rope
        )
    return keys


def commit_staged(state: SessionState, staged: StagedPatch, digest: bytes) -> None:
    """Write a staged patch into the state; on any failure, restore the old rows and re-raise."""
    if staged.version != state.version + 1 or staged.old_row_count != state.row_count:
        raise RuntimeError(
            f"session {state.session_id}: staged v{staged.version} over {staged.old_row_count} "
            f"rows does not follow v{state.version} with {state.row_count} rows"
        )
    s, e = staged.start, staged.new_row_count
    old_end = max(state.row_count, e)
    saved = (
        state.keys[:, :, s:old_end].clone(),
        state.canonical_keys[:, :, s:old_end].clone(),
        state.values[:, :, s:old_end].clone(),
        state.token_ids.clone(),
        state.origin_positions.clone(),
        state.brightness.clone(),
        list(state.meta),
        (state.row_count, state.version, state.digest, state.next_ledger_id),
    )
    try:
        state.keys[:, :, s:e] = staged.keys
        state.canonical_keys[:, :, s:e] = staged.canonical_keys
        state.values[:, :, s:e] = staged.values
        state.token_ids[s:e] = staged.token_ids
        state.origin_positions[s:e] = staged.origin_positions
        state.brightness[s:e] = staged.brightness_tail
        if staged.brightness_head is not None:
            state.brightness[:s] = staged.brightness_head
        state.meta[s:] = staged.meta
        state.row_count = e
        state.version = staged.version
        state.digest = digest
        state.next_ledger_id = staged.next_ledger_id
        check_blades(state)
    except BaseException:
        state.keys[:, :, s:old_end] = saved[0]
        state.canonical_keys[:, :, s:old_end] = saved[1]
        state.values[:, :, s:old_end] = saved[2]
        state.token_ids.copy_(saved[3])
        state.origin_positions.copy_(saved[4])
        state.brightness.copy_(saved[5])
        state.meta[:] = saved[6]
        state.row_count, state.version, state.digest, state.next_ledger_id = saved[7]
        raise


def check_blades(state: SessionState) -> None:
    """Invariant 2: as many mirror entries as rows (both blades are cut from the same segments,
    so a length mismatch is the one way they can disagree)."""
    if len(state.meta) != state.row_count:
        raise RuntimeError(
            f"session {state.session_id} v{state.version}: mirror has {len(state.meta)} entries "
            f"for {state.row_count} rows"
        )
