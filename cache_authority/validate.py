"""Stage one of a patch: check every op against the state at expected_version, change nothing.

Status per failure (STYLE.md rule 7): malformed input (shapes, dtypes, NaN, ids outside the
vocabulary, positions outside the rows, overlapping ops) is INVALID_ARGUMENT; an expectation the
client wrote down that the state does not meet (expected token ids, the row count an Append or a
SetBrightness was computed for) is FAILED_PRECONDITION; more rows than the hard maximum is
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from cache_authority.ops import AppendOp, EvictOp, Op, PatchError, ReplacePairOp, SetBrightnessOp
from cache_authority.ops import Status as S
from cache_authority.rows import SessionState
from positronic.limits import MAX_BRIGHTNESS


def validate_ops(state: SessionState, ops: Sequence[Op]) -> None:
    """Check every op against the state; raise PatchError on the first problem, change nothing."""
    if not ops:
        raise PatchError(S.INVALID_ARGUMENT, "patch has no ops")
    n = state.row_count
    next_append = n
    touched: set[int] = set()
    removed = 0
    brightness_ops = 0
    for i, op in enumerate(ops):
        what = f"op {i} ({type(op).__name__})"
        if isinstance(op, AppendOp):
            count = len(op.token_ids)
            if count == 0:
                raise PatchError(S.INVALID_ARGUMENT, f"{what}: no tokens")
            if op.position < 0:
                raise PatchError(S.INVALID_ARGUMENT, f"{what}: negative position {op.position}")
            if op.position != next_append:
                raise PatchError(
                    S.FAILED_PRECONDITION,
                    f"{what}: appends at {op.position}, the rows end at {next_append}",
                )
            for t in op.token_ids:
                _check_token(state, t, what)
            _check_kv(state, op.keys, op.values, count, what)
            if op.pieces and len(op.pieces) != count:
                raise PatchError(S.INVALID_ARGUMENT, f"{what}: {len(op.pieces)} pieces")
            if op.brightness and len(op.brightness) != count:
                raise PatchError(S.INVALID_ARGUMENT, f"{what}: {len(op.brightness)} values")
            _check_finite(op.brightness, what)
            next_append += count
        elif isinstance(op, ReplacePairOp):
            _check_position(state, op.position, what, width=2)
            if len(op.expected_token_ids) != 2:
                raise PatchError(S.INVALID_ARGUMENT, f"{what}: needs 2 expected token ids")
            _check_token(state, op.token_id, what)
            _check_kv(state, op.keys, op.values, 1, what)
            _check_finite((op.brightness,), what)
            pair = {op.position, op.position + 1}
            if pair & touched:
                raise PatchError(S.INVALID_ARGUMENT, f"{what}: overlaps another op")
            touched |= pair
            removed += 1
            _check_expected(state, op.position, op.expected_token_ids, what)
        elif isinstance(op, EvictOp):
            _check_position(state, op.position, what)
            if op.position in touched:
                raise PatchError(S.INVALID_ARGUMENT, f"{what}: overlaps another op")
            touched.add(op.position)
            removed += 1
            _check_expected(state, op.position, (op.expected_token_id,), what)
        elif isinstance(op, SetBrightnessOp):
            brightness_ops += 1
            if brightness_ops > 1:
                raise PatchError(S.INVALID_ARGUMENT, f"{what}: a patch sets brightness once")
            if len(op.brightness) != op.expected_row_count:
                raise PatchError(
                    S.INVALID_ARGUMENT,
                    f"{what}: {len(op.brightness)} values for {op.expected_row_count} rows",
                )
            if op.expected_row_count != n:
                raise PatchError(
                    S.FAILED_PRECONDITION,
                    f"{what}: computed for {op.expected_row_count} rows, the session has {n}",
                )
            _check_finite(op.brightness, what)
        else:  # pragma: no cover - op_from_pb only builds the four kinds
            raise PatchError(S.INVALID_ARGUMENT, f"{what}: unknown op")
    final = next_append - removed
    if final > state.budget.hard_max_rows:
        raise PatchError(
            S.RESOURCE_EXHAUSTED,
            f"patch leaves {final} rows, over the hard maximum of {state.budget.hard_max_rows}",
        )


def _check_kv(
    state: SessionState, keys: torch.Tensor, values: torch.Tensor, n: int, what: str
) -> None:
    g = state.geometry
    want = g.kv_shape(n)
    for name, t in (("keys", keys), ("values", values)):
        if t.dtype != g.dtype:
            raise PatchError(
                S.INVALID_ARGUMENT, f"{what}: {name} dtype {t.dtype}, session holds {g.dtype}"
            )
        if tuple(t.shape) != want:
            raise PatchError(
                S.INVALID_ARGUMENT,
                f"{what}: {name} shape {list(t.shape)}, session geometry needs {list(want)}",
            )
        # Random bytes decode to NaN/inf often; one such key would poison every later softmax.
        if not _all_finite(t):
            raise PatchError(S.INVALID_ARGUMENT, f"{what}: {name} contains NaN or inf")


def _check_finite(values: Iterable[float] | torch.Tensor, what: str) -> None:
    """Brightness in [0, MAX_BRIGHTNESS] (session.proto); NaN fails both comparisons. A tensor
    (SetBrightness: one value per row, every tick) is checked in one vectorized pass."""
    if isinstance(values, torch.Tensor):
        if values.numel() == 0:
            return
        lo, hi = torch.aminmax(values)  # NaN propagates to both and fails both comparisons
        ok = lo.item() >= 0.0 and hi.item() <= MAX_BRIGHTNESS
    else:
        ok = all(0.0 <= v <= MAX_BRIGHTNESS for v in values)
    if not ok:
        raise PatchError(
            S.INVALID_ARGUMENT, f"{what}: brightness outside [0, {MAX_BRIGHTNESS:g}] (or NaN)"
        )


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in t. One reduction (aminmax propagates NaN, and an inf is its own min or
    max): 4x (f32, 160 values) to 18x (f16, TinyLlama's row) cheaper than isfinite().all(),
    which runs several kernels; this runs on every K/V of every patch."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return -math.inf < lo.item() and hi.item() < math.inf


def _check_token(state: SessionState, token_id: int, what: str) -> None:
    if not 0 <= token_id < state.geometry.vocab_size:
        raise PatchError(
            S.INVALID_ARGUMENT,
            f"{what}: token id {token_id} outside the vocabulary [0, {state.geometry.vocab_size})",
        )


def _check_position(state: SessionState, position: int, what: str, width: int = 1) -> None:
    if position < 0 or position + width > state.row_count:
        raise PatchError(
            S.INVALID_ARGUMENT,
            f"{what}: position {position} (width {width}) outside rows [0, {state.row_count})",
        )


def _check_expected(state: SessionState, position: int, expected: Sequence[int], what: str):
    actual = state.row_token_ids(position, position + len(expected))
    if actual != list(expected):
        raise PatchError(
            S.FAILED_PRECONDITION,
            f"{what}: expected tokens {list(expected)} at {position}, found {actual}",
        )
