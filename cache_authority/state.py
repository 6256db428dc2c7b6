"""Session state and the two-bladed ops: every op changes KV rows and the mirror together.

This is the only code that changes a session's rows. The authority's patch engine calls it to
commit a patch; a worker replica calls `replay_committed` to replay the committed log (the same
stage and commit), so the replica is, bit for bit, what the authority holds.

A patch is applied in three stages, each in its own module and re-exported here:
  validate_ops  (validate.py) - checks every op against the state at expected_version;
  stage_ops     (stage.py)    - plans the slot moves and the new rows, touching nothing;
  commit_staged (stage.py)    - carries the plan out on buffers and mirror, all or nothing
                                (slots.py: the primitive writes and their undo log).

The authority keeps canonical keys only (as computed at each row's origin position); replicas
(`SessionState(rotated=True)`) also keep keys rotated to each row's current position, re-derived
once from the canonical key whenever a row moves (DESIGN.md invariant 5). Row i sits in slot
position_offset + i, which is also its rotary position (rows.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from cache_authority.ops import Op
from cache_authority.rows import Budget, Geometry, RowMeta, SessionState, slot_capacity
from cache_authority.stage import (
    CommitStats,
    StagedPatch,
    check_blades,
    commit_staged,
    moves_head,
    stage_ops,
)
from cache_authority.validate import validate_ops

__all__ = [
    "Budget",
    "CommitStats",
    "Geometry",
    "RowMeta",
    "SessionState",
    "StagedPatch",
    "apply_ops",
    "check_blades",
    "commit_staged",
    "moves_head",
    "replay_committed",
    "slot_capacity",
    "stage_ops",
    "validate_ops",
]


def apply_ops(state: SessionState, ops: Sequence[Op], version: int, digest: bytes) -> StagedPatch:
    """Validate, stage and commit in one call (replicas replaying the committed log use this)."""
    validate_ops(state, ops)
    staged = stage_ops(state, ops, version)
    commit_staged(state, staged, digest)
    return staged


def replay_committed(
    state: SessionState, ops: Sequence[Op], version: int, digest: bytes
) -> StagedPatch:
    """Stage and commit a patch the authority committed, without validating it again: the
    caller has checked `digest` against the chain from this state's digest, so these are the
    ops the authority validated against this very state (same history, same rows), and
    validating them again can only agree. Replicas use this on the per-token path, where
    validation (finite K/V, brightness range, expected tokens) was a fifth of the apply.

    Nor does it keep an undo log: a replay that fails (an authority's bug) leaves `state`
    half-written, and the caller must drop it and resync, as for a digest mismatch."""
    staged = stage_ops(state, ops, version)
    commit_staged(state, staged, digest, restorable=False)
    return staged
