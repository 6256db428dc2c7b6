"""The primitive writes of a commit: move a run of slots, write new rows, set brightness; each
saves what it overwrites in an undo log first, so a commit that fails midway restores the state
exactly, at the cost of the slots it touched (never the whole buffer).

In replica mode every slot a primitive writes also gets its rotated key re-derived, in one step,
from its canonical key: rotate by (slot - origin), the slot being the row's rotary position
(DESIGN.md invariant 5: one rotation from the canonical key, never accumulated). The primitives
only mark the slots they wrote; `rederive_marked` rotates them once the commit has written every
row, one call per run of adjacent slots: a merge's moved side, its new row and the appended row
are one or two runs, where rotating at each write cost three calls (each ~20 small tensor ops,
the largest part of a replica's apply). A rotated key depends only on its slot's canonical key
and origin, which change only when the slot is written, so the result is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cache_authority.rows import RowMeta, SessionState
from positronic.rope import rerotate_from_canonical


@dataclass
class NewRows:
    """Rows a patch brings: appended tokens or a merged pair's replacement."""

    token_ids: torch.Tensor  # [N] int64
    keys: torch.Tensor  # [L, H, N, D] canonical, as computed at origin_positions
    values: torch.Tensor  # [L, H, N, D]
    origin_positions: torch.Tensor  # [N] int64, absolute rotary positions
    brightness: torch.Tensor  # [N] float32
    meta: list[RowMeta]

    @property
    def count(self) -> int:
        return len(self.meta)


@dataclass
class UndoLog:
    """What a commit overwrote, to put back on failure; and how many slots it wrote.

    `keep=False` keeps nothing (a replica replaying the committed log: one that fails is dropped
    and resynced from a snapshot, so the copies, a third of its commit, would never be read)."""

    state: SessionState
    keep: bool = True
    kv_slots_written: int = 0  # K/V slots written (moved or new), rotated keys not counted twice
    marked: list[tuple[int, int]] = field(default_factory=list)  # (slot, count) to re-rotate
    _saved: list[tuple[torch.Tensor, int, int, torch.Tensor]] = field(default_factory=list)
    _meta: list[RowMeta] = field(init=False)
    _scalars: tuple = field(init=False)

    def __post_init__(self) -> None:
        s = self.state
        self._meta = list(s.meta) if self.keep else []  # pointers only: O(rows) of 8 bytes
        self._scalars = (s.row_count, s.position_offset, s.version, s.digest, s.next_ledger_id)

    def save(self, buffer: torch.Tensor, dim: int, start: int, count: int) -> None:
        """Keep a copy of buffer's slots [start, start + count) along `dim`."""
        if count and self.keep:
            self._saved.append((buffer, dim, start, buffer.narrow(dim, start, count).clone()))

    @property
    def saved_slots(self) -> int:
        return sum(copy.shape[dim] for _, dim, _, copy in self._saved)

    def restore(self) -> None:
        """Put every saved slot back (newest first) and the mirror and counters with them."""
        if not self.keep:
            raise RuntimeError("this commit kept no undo log; its state must be dropped")
        for buffer, dim, start, copy in reversed(self._saved):
            buffer.narrow(dim, start, copy.shape[dim]).copy_(copy)
        self._saved.clear()
        s = self.state
        s.meta[:] = self._meta
        s.row_count, s.position_offset, s.version, s.digest, s.next_ledger_id = self._scalars


def _carried(state: SessionState) -> list[tuple[torch.Tensor, int]]:
    """(buffer, slot dim) of everything a row carries when it moves. Rotated keys are not
    carried: a row that moves changes position, so its rotated key is re-derived instead."""
    return [
        (state.canonical_keys, 2),
        (state.values, 2),
        (state.token_ids, 0),
        (state.origin_positions, 0),
        (state.brightness, 0),
    ]


def move_slots(state: SessionState, src: int, dst: int, count: int, undo: UndoLog) -> None:
    """Move slots [src, src + count) to [dst, dst + count) (the ranges may overlap)."""
    if count <= 0 or src == dst:
        return
    overlap = abs(src - dst) < count
    for buffer, dim in _carried(state):
        undo.save(buffer, dim, dst, count)
        source = buffer.narrow(dim, src, count)
        # torch refuses a copy between partially overlapping views; the copy is of the moved
        # side only (the shorter one), so cloning it keeps the cost O(count).
        buffer.narrow(dim, dst, count).copy_(source.clone() if overlap else source)
    undo.kv_slots_written += count
    undo.marked.append((dst, count))


def write_rows(state: SessionState, slot: int, rows: NewRows, undo: UndoLog) -> None:
    """Write new rows into slots [slot, slot + rows.count), copying them to the state's device."""
    n = rows.count
    for buffer, dim, data in (
        (state.canonical_keys, 2, rows.keys),
        (state.values, 2, rows.values),
        (state.token_ids, 0, rows.token_ids),
        (state.origin_positions, 0, rows.origin_positions),
        (state.brightness, 0, rows.brightness),
    ):
        undo.save(buffer, dim, slot, n)
        buffer.narrow(dim, slot, n).copy_(data)
    undo.kv_slots_written += n
    undo.marked.append((slot, n))


def write_brightness(state: SessionState, slot: int, values: torch.Tensor, undo: UndoLog) -> None:
    """Brightness [N] of slots [slot, slot + N)."""
    undo.save(state.brightness, 0, slot, values.numel())
    state.brightness[slot : slot + values.numel()] = values


def rederive_marked(state: SessionState, undo: UndoLog) -> None:
    """Replica mode: re-derive the rotated keys of every slot the commit wrote (undo.marked),
    one rederive_rotated per maximal run of adjacent or overlapping marked slots."""
    marked, undo.marked = sorted(undo.marked), []
    if state.rotated_keys is None or not marked:
        return
    start, end = marked[0][0], marked[0][0] + marked[0][1]
    for slot, count in marked[1:]:
        if slot > end:
            rederive_rotated(state, start, end - start, undo)
            start, end = slot, slot + count
        else:
            end = max(end, slot + count)
    rederive_rotated(state, start, end - start, undo)


def rederive_rotated(state: SessionState, slot: int, count: int, undo: UndoLog) -> None:
    """Replica mode: the rotated keys of slots [slot, slot + count), each rotated once from its
    canonical key to its position (= its slot)."""
    if state.rotated_keys is None or count <= 0:
        return
    undo.save(state.rotated_keys, 2, slot, count)
    state.rotated_keys[:, :, slot : slot + count] = rotated_slots(state, slot, count)


def rotated_slots(state: SessionState, slot: int, count: int) -> torch.Tensor:
    """Keys [L, H, count, D] of slots [slot, slot + count) rotated to their positions: the one
    function replicas, snapshots and tests derive rotated keys with."""
    positions = torch.arange(slot, slot + count, dtype=torch.int64)
    return rerotate_from_canonical(
        state.canonical_keys[:, :, slot : slot + count],
        state.origin_positions[slot : slot + count],
        positions,
        state.geometry.rope,
    )
