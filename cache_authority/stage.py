"""Stages two and three of a patch: plan the slot moves, then carry them out.

stage_ops plans, without touching the state: the brightness to set, each edit (highest position
first, so every position the client sent against the rows at expected_version still names the
row it meant) with the side of the rows it moves, whether the appended rows need a rebase first,
and the new rows themselves. commit_staged carries the plan out with an undo log of only the
slots it writes, restoring them exactly if anything fails.

An edit removes rows at row p: a ReplacePair takes out the pair (p, p + 1) and writes its
replacement where the pair was, an Evict takes out row p. Either way one row fewer remains, and
the shorter side closes the gap: the head [0, p) moves up one slot (the position offset grows)
when it is strictly shorter than the tail after the edit, else the tail moves down one slot (the
offset stays; ties go to the tail, which keeps rebases rarer). So an edit costs O(min(head,
tail)) slot moves, never O(rows). Appends write after the last row; when they would pass the
buffer's C slots, the rows are first moved back to slots [0, n) (a rebase, O(rows), at most once
every C - hard_max appended rows). Nothing here depends on anything but the committed ops and the
budget, so every replica makes the same moves and holds the same offset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cache_authority import slots
from cache_authority.ops import AppendOp, EvictOp, Op, ReplacePairOp, SetBrightnessOp
from cache_authority.rows import RowMeta, SessionState
from cache_authority.slots import NewRows, UndoLog
from positronic.v1 import session_pb2


@dataclass(frozen=True)
class Edit:
    """Take `width` rows out at row `position` (2 for a merged pair, 1 for an eviction), write
    `new` where they were (a merge), and close the gap from the side `move_head` names."""

    position: int
    width: int
    new: NewRows | None
    move_head: bool

    @property
    def removed(self) -> int:
        return self.width - (self.new.count if self.new is not None else 0)


@dataclass
class StagedPatch:
    """A validated patch as a plan of slot moves and new rows, ready to commit."""

    version: int
    old_row_count: int
    old_offset: int
    new_row_count: int
    new_offset: int
    brightness: torch.Tensor | None  # [old_row_count] float32, when the patch sets it
    edits: list[Edit]  # highest position first
    rebase: bool  # move the rows to slots [0, n) before appending
    append_rows: list[NewRows] = field(default_factory=list)
    next_ledger_id: int = 0
    appended: int = 0
    merged: int = 0
    evicted: int = 0


@dataclass(frozen=True)
class CommitStats:
    """What a commit wrote: K/V slots (moved or new) and slots kept for undo, over all buffers."""

    kv_slots_written: int
    saved_slots: int


def moves_head(position: int, width: int, row_count: int) -> bool:
    """The side an edit of `width` rows at `position` moves: the head [0, position) when it is
    strictly shorter than the tail after the edit [position + width, row_count)."""
    return position < row_count - position - width


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


def _append_rows(state: SessionState, op: AppendOp, first_ledger: int, version: int) -> NewRows:
    count = len(op.token_ids)
    # The K/V were computed at the row's absolute position: offset + row index at expected_version.
    origin = state.position_offset + op.position
    metas = [
        RowMeta(
            ledger_id=first_ledger + j,
            piece=op.pieces[j] if op.pieces else "",
            source=op.source,
            origin_position=origin + j,
            created_version=version,
        )
        for j in range(count)
    ]
    bright = list(op.brightness) if op.brightness else [state.seed_brightness] * count
    return NewRows(
        token_ids=torch.tensor(op.token_ids, dtype=torch.int64),
        keys=op.keys,
        values=op.values,
        origin_positions=torch.arange(origin, origin + count, dtype=torch.int64),
        brightness=torch.tensor(bright, dtype=torch.float32),
        meta=metas,
    )


def _merged_row(state: SessionState, op: ReplacePairOp, ledger: int, version: int) -> NewRows:
    p = op.position
    a, b = state.meta[p], state.meta[p + 1]
    origin = state.position_offset + p
    meta = RowMeta(
        ledger_id=ledger,
        piece=op.piece,
        source=session_pb2.TOKEN_SOURCE_MERGED,
        origin_position=origin,
        created_version=version,
        replaced_ledger_ids=(a.ledger_id, b.ledger_id),
        replaced_token_ids=tuple(op.expected_token_ids),
        replaced_text=op.replaced_text,
    )
    return NewRows(
        token_ids=torch.tensor([op.token_id], dtype=torch.int64),
        keys=op.keys,
        values=op.values,
        origin_positions=torch.tensor([origin], dtype=torch.int64),
        brightness=torch.tensor([op.brightness], dtype=torch.float32),
        meta=[meta],
    )


def stage_ops(state: SessionState, ops: Sequence[Op], version: int) -> StagedPatch:
    """Plan the patch without touching `state`. Ops must have passed validate_ops."""
    n, base = state.row_count, state.position_offset
    brightness = None
    for op in ops:
        if isinstance(op, SetBrightnessOp):
            brightness = op.brightness
    firsts, next_ledger = _ledger_ids(state, ops)
    edit_ops = [(i, op) for i, op in enumerate(ops) if isinstance(op, ReplacePairOp | EvictOp)]
    edits: list[Edit] = []
    merged = evicted = 0
    for i, op in sorted(edit_ops, key=lambda e: e[1].position, reverse=True):
        if isinstance(op, ReplacePairOp):
            new, width = _merged_row(state, op, firsts[i], version), 2
            merged += 1
        else:
            new, width = None, 1
            evicted += 1
        edit = Edit(op.position, width, new, moves_head(op.position, width, n))
        edits.append(edit)
        n -= edit.removed
        base += edit.removed if edit.move_head else 0
    append_rows = [
        _append_rows(state, op, firsts[i], version)
        for i, op in enumerate(ops)
        if isinstance(op, AppendOp)
    ]
    appended = sum(r.count for r in append_rows)
    rebase = appended > 0 and base + n + appended > state.capacity
    return StagedPatch(
        version=version,
        old_row_count=state.row_count,
        old_offset=state.position_offset,
        new_row_count=n + appended,
        new_offset=0 if rebase else base,
        brightness=brightness,
        edits=edits,
        rebase=rebase,
        append_rows=append_rows,
        next_ledger_id=next_ledger,
        appended=appended,
        merged=merged,
        evicted=evicted,
    )


def commit_staged(
    state: SessionState, staged: StagedPatch, digest: bytes, restorable: bool = True
) -> CommitStats:
    """Carry out a staged patch; on any failure, restore every slot it wrote and re-raise.
    `restorable=False` keeps no undo log: a failure leaves the state half-written, and the
    caller must drop it (a replica, which resyncs)."""
    if (staged.version, staged.old_row_count, staged.old_offset) != (
        state.version + 1,
        state.row_count,
        state.position_offset,
    ):
        raise RuntimeError(
            f"session {state.session_id}: staged v{staged.version} over {staged.old_row_count} "
            f"rows at offset {staged.old_offset} does not follow v{state.version} with "
            f"{state.row_count} rows at offset {state.position_offset}"
        )
    undo = UndoLog(state, keep=restorable)
    try:
        _carry_out(state, staged, undo)
        slots.rederive_marked(state, undo)
        state.version = staged.version
        state.digest = digest
        state.next_ledger_id = staged.next_ledger_id
        check_blades(state)
    except BaseException:
        if restorable:
            undo.restore()
        raise
    return CommitStats(undo.kv_slots_written, undo.saved_slots)


def _carry_out(state: SessionState, staged: StagedPatch, undo: UndoLog) -> None:
    base, n = staged.old_offset, staged.old_row_count
    if staged.brightness is not None:
        slots.write_brightness(state, base, staged.brightness, undo)
    for e in staged.edits:
        p, removed = e.position, e.removed
        if e.move_head:
            slots.move_slots(state, base, base + removed, p, undo)
            base += removed
        else:
            after = p + e.width
            slots.move_slots(state, base + after, base + after - removed, n - after, undo)
        if e.new is not None:
            slots.write_rows(state, base + p, e.new, undo)
        state.meta[p : p + e.width] = e.new.meta if e.new is not None else []
        n -= removed
    if staged.rebase:
        slots.move_slots(state, base, 0, n, undo)
        base = 0
    for rows in staged.append_rows:
        slots.write_rows(state, base + n, rows, undo)
        state.meta.extend(rows.meta)
        n += rows.count
    state.position_offset, state.row_count = base, n
    if (base, n) != (staged.new_offset, staged.new_row_count):
        raise RuntimeError(
            f"session {state.session_id}: commit left {n} rows at offset {base}, the plan "
            f"said {staged.new_row_count} at {staged.new_offset}"
        )


def check_blades(state: SessionState) -> None:
    """Invariant 2: as many mirror entries as rows (both blades are cut by the same edits, so a
    length mismatch is the one way they can disagree)."""
    if len(state.meta) != state.row_count:
        raise RuntimeError(
            f"session {state.session_id} v{state.version}: mirror has {len(state.meta)} entries "
            f"for {state.row_count} rows"
        )
