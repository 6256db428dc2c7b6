"""Session state and the two-bladed ops: every op changes KV rows and the mirror together.

This module is the only code that changes a session's rows. The authority's patch engine calls it
to commit a patch; a worker replica calls the same functions to replay the committed log, so the
replica is, bit for bit, what the authority holds.

A patch is applied in two stages:
  validate_ops  - checks every op against the state at expected_version (raises PatchError);
  stage_ops     - builds the new tail of the rows (the region from the lowest touched position
                  to the end) in fresh tensors, applying ops from the highest position down;
  commit_staged - writes the staged tail into the preallocated buffers and the mirror, restoring
                  the old tail if anything goes wrong, so a patch applies all its ops or none.

Keys are kept twice: `canonical_keys`, exactly as computed at each row's origin position, and
`keys`, rotated to the row's current index. Rows that moved are re-rotated from their canonical
key by (index - origin) in one step (DESIGN.md invariant 5); nothing accumulates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cache_authority.ops import (
    AppendOp,
    EvictOp,
    Op,
    PatchError,
    ReplacePairOp,
    SetBrightnessOp,
    Status,
)
from positronic.rope import Rope, rerotate_from_canonical
from positronic.v1 import session_pb2


@dataclass(frozen=True)
class Geometry:
    """Shape and identity of a session's rows."""

    num_layers: int  # L
    num_kv_heads: int  # H
    head_dim: int  # D
    dtype: torch.dtype
    rope: Rope
    vocab_size: int
    model_fingerprint: str = ""
    max_position_embeddings: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"geometry {name} must be positive")
        if self.rope.head_dim != self.head_dim:
            raise ValueError(
                f"rope has {self.rope.inv_freq.numel()} frequencies; head_dim {self.head_dim} "
                f"needs {self.head_dim // 2}"
            )
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"KV dtype must be float32, float16 or bfloat16, not {self.dtype}")

    def kv_shape(self, n: int) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_kv_heads, n, self.head_dim)

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's K and V across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize


@dataclass(frozen=True)
class Budget:
    target_rows: int
    hard_max_rows: int

    def __post_init__(self) -> None:
        if self.hard_max_rows <= 0:
            raise ValueError("hard_max_rows must be positive")
        if not 0 < self.target_rows <= self.hard_max_rows:
            raise ValueError("target_rows must be in [1, hard_max_rows]")


@dataclass
class RowMeta:
    """The mirror's per-row metadata that is not a tensor."""

    ledger_id: int
    piece: str
    source: int  # session_pb2.TokenSource
    origin_position: int
    created_version: int
    replaced_ledger_ids: tuple[int, ...] = ()
    replaced_token_ids: tuple[int, ...] = ()


@dataclass
class SessionState:
    """Preallocated rows plus the mirror. Row i holds the K/V of token_ids[i] at position i."""

    session_id: str
    geometry: Geometry
    budget: Budget
    seed_brightness: float = 255.0
    version: int = 0
    digest: bytes = b""
    next_ledger_id: int = 0
    row_count: int = 0
    created_unix_ns: int = 0
    # Tensors, preallocated to hard_max_rows (S); only [:row_count] is meaningful.
    keys: torch.Tensor = field(init=False)  # [L, H, S, D], rotated to the row's index
    canonical_keys: torch.Tensor = field(init=False)  # [L, H, S, D], as computed at origin
    values: torch.Tensor = field(init=False)  # [L, H, S, D]
    token_ids: torch.Tensor = field(init=False)  # [S] int64
    origin_positions: torch.Tensor = field(init=False)  # [S] int64
    brightness: torch.Tensor = field(init=False)  # [S] float32
    meta: list[RowMeta] = field(default_factory=list)

    def __post_init__(self) -> None:
        shape = self.geometry.kv_shape(self.budget.hard_max_rows)
        dt = self.geometry.dtype
        self.keys = torch.zeros(shape, dtype=dt)
        self.canonical_keys = torch.zeros(shape, dtype=dt)
        self.values = torch.zeros(shape, dtype=dt)
        s = self.budget.hard_max_rows
        self.token_ids = torch.zeros(s, dtype=torch.int64)
        self.origin_positions = torch.zeros(s, dtype=torch.int64)
        self.brightness = torch.zeros(s, dtype=torch.float32)

    # Read-only views over the live rows.
    def live_keys(self) -> torch.Tensor:
        return self.keys[:, :, : self.row_count]

    def live_values(self) -> torch.Tensor:
        return self.values[:, :, : self.row_count]

    def live_token_ids(self) -> list[int]:
        return self.token_ids[: self.row_count].tolist()


@dataclass
class _Segment:
    """A run of rows in a staged tail: old rows [start, stop) or new rows given as tensors."""

    start: int = 0
    stop: int = 0
    new: _NewRows | None = None

    def __len__(self) -> int:
        return self.stop - self.start if self.new is None else len(self.new.token_ids)


@dataclass
class _NewRows:
    token_ids: list[int]
    canonical_keys: torch.Tensor  # [L, H, N, D]
    values: torch.Tensor  # [L, H, N, D]
    origin_positions: list[int]
    brightness: list[float]
    meta: list[RowMeta]


@dataclass
class StagedPatch:
    """A validated patch turned into the new tail of the rows, ready to commit."""

    version: int
    start: int  # first row index the tail replaces
    old_row_count: int
    new_row_count: int
    keys: torch.Tensor  # [L, H, T, D]
    canonical_keys: torch.Tensor
    values: torch.Tensor
    token_ids: torch.Tensor  # [T]
    origin_positions: torch.Tensor
    brightness_tail: torch.Tensor  # [T]
    brightness_head: torch.Tensor | None  # [start] when SetBrightness changed the head
    meta: list[RowMeta]
    next_ledger_id: int
    appended: int = 0
    merged: int = 0
    evicted: int = 0


def _check_kv(state: SessionState, keys: torch.Tensor, values: torch.Tensor, n: int, what: str):
    g = state.geometry
    want = g.kv_shape(n)
    for name, t in (("keys", keys), ("values", values)):
        if t.dtype != g.dtype:
            raise PatchError(
                Status.INVALID_ARGUMENT, f"{what}: {name} dtype {t.dtype}, session holds {g.dtype}"
            )
        if tuple(t.shape) != want:
            raise PatchError(
                Status.INVALID_ARGUMENT,
                f"{what}: {name} shape {list(t.shape)}, session geometry needs {list(want)}",
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise PatchError(Status.INVALID_ARGUMENT, f"{what}: {name} contains NaN or inf")


def _check_token(state: SessionState, token_id: int, what: str) -> None:
    if not 0 <= token_id < state.geometry.vocab_size:
        raise PatchError(
            Status.INVALID_ARGUMENT,
            f"{what}: token id {token_id} outside the vocabulary [0, {state.geometry.vocab_size})",
        )


def _check_position(state: SessionState, position: int, what: str, width: int = 1) -> None:
    if position < 0 or position + width > state.row_count:
        raise PatchError(
            Status.INVALID_ARGUMENT,
            f"{what}: position {position} (width {width}) outside rows [0, {state.row_count})",
        )


def validate_ops(state: SessionState, ops: list[Op]) -> None:
    """Check every op against the state; raise PatchError on the first problem, change nothing."""
    n = state.row_count
    next_append = n
    touched: set[int] = set()
    removed = 0
    for i, op in enumerate(ops):
        what = f"op {i} ({type(op).__name__})"
        if isinstance(op, AppendOp):
            count = len(op.token_ids)
            if count == 0:
                raise PatchError(Status.INVALID_ARGUMENT, f"{what}: no tokens")
            if op.position != next_append:
                raise PatchError(
                    Status.FAILED_PRECONDITION,
                    f"{what}: appends at {op.position}, the rows end at {next_append}",
                )
            for t in op.token_ids:
                _check_token(state, t, what)
            _check_kv(state, op.keys, op.values, count, what)
            if op.pieces and len(op.pieces) != count:
                raise PatchError(Status.INVALID_ARGUMENT, f"{what}: {len(op.pieces)} pieces")
            if op.brightness and len(op.brightness) != count:
                raise PatchError(Status.INVALID_ARGUMENT, f"{what}: {len(op.brightness)} values")
            next_append += count
        elif isinstance(op, ReplacePairOp):
            _check_position(state, op.position, what, width=2)
            if len(op.expected_token_ids) != 2:
                raise PatchError(Status.INVALID_ARGUMENT, f"{what}: needs 2 expected token ids")
            _check_token(state, op.token_id, what)
            _check_kv(state, op.keys, op.values, 1, what)
            pair = {op.position, op.position + 1}
            if pair & touched:
                raise PatchError(Status.INVALID_ARGUMENT, f"{what}: overlaps another op")
            touched |= pair
            removed += 1
            _check_expected(state, op.position, op.expected_token_ids, what)
        elif isinstance(op, EvictOp):
            _check_position(state, op.position, what)
            if op.position in touched:
                raise PatchError(Status.INVALID_ARGUMENT, f"{what}: overlaps another op")
            touched.add(op.position)
            removed += 1
            _check_expected(state, op.position, (op.expected_token_id,), what)
        elif isinstance(op, SetBrightnessOp):
            if op.expected_row_count != n or len(op.brightness) != n:
                raise PatchError(
                    Status.FAILED_PRECONDITION,
                    f"{what}: {len(op.brightness)} values for {op.expected_row_count} rows, "
                    f"the session has {n}",
                )
            if not all(v == v and abs(v) != float("inf") for v in op.brightness):
                raise PatchError(Status.INVALID_ARGUMENT, f"{what}: NaN or inf brightness")
        else:  # pragma: no cover - from_pb only builds the four kinds
            raise PatchError(Status.INVALID_ARGUMENT, f"{what}: unknown op")
    final = next_append - removed
    if final > state.budget.hard_max_rows:
        raise PatchError(
            Status.RESOURCE_EXHAUSTED,
            f"patch leaves {final} rows, over the hard maximum of {state.budget.hard_max_rows}",
        )


def _check_expected(state: SessionState, position: int, expected, what: str) -> None:
    actual = state.token_ids[position : position + len(expected)].tolist()
    if actual != list(expected):
        raise PatchError(
            Status.FAILED_PRECONDITION,
            f"{what}: expected tokens {list(expected)} at {position}, found {actual}",
        )


def stage_ops(state: SessionState, ops: list[Op], version: int) -> StagedPatch:
    """Build the patched tail without touching `state`. Ops must have passed validate_ops."""
    n = state.row_count
    brightness = state.brightness[:n].clone()
    for op in ops:
        if isinstance(op, SetBrightnessOp):
            brightness = torch.tensor(op.brightness, dtype=torch.float32)
    structural = [op for op in ops if not isinstance(op, SetBrightnessOp)]
    start = min((op.position for op in structural if not isinstance(op, AppendOp)), default=n)
    ledger = state.next_ledger_id
    appended = merged = evicted = 0
    # Segments covering [start, n) plus appended rows; edited from the highest position down so
    # every op's position (given against the pre-patch rows) still points at the same row.
    segments: list[_Segment] = [_Segment(start, n)] if start < n else []
    appends = [op for op in structural if isinstance(op, AppendOp)]
    for op in appends:
        count = len(op.token_ids)
        metas = []
        for j in range(count):
            metas.append(
                RowMeta(
                    ledger_id=ledger,
                    piece=op.pieces[j] if op.pieces else "",
                    source=op.source,
                    origin_position=op.position + j,
                    created_version=version,
                )
            )
            ledger += 1
        bright = list(op.brightness) if op.brightness else [state.seed_brightness] * count
        segments.append(
            _Segment(
                new=_NewRows(
                    list(op.token_ids),
                    op.keys,
                    op.values,
                    [op.position + j for j in range(count)],
                    bright,
                    metas,
                )
            )
        )
        appended += count
    edits = sorted(
        (op for op in structural if not isinstance(op, AppendOp)),
        key=lambda op: op.position,
        reverse=True,
    )
    for op in edits:
        if isinstance(op, ReplacePairOp):
            p = op.position
            a, b = state.meta[p], state.meta[p + 1]
            new = _NewRows(
                [op.token_id],
                op.keys,
                op.values,
                [p],
                [op.brightness],
                [
                    RowMeta(
                        ledger_id=ledger,
                        piece=op.piece,
                        source=session_pb2.TOKEN_SOURCE_MERGED,
                        origin_position=p,
                        created_version=version,
                        replaced_ledger_ids=(a.ledger_id, b.ledger_id),
                        replaced_token_ids=tuple(op.expected_token_ids),
                    )
                ],
            )
            ledger += 1
            segments = _splice(segments, p, 2, _Segment(new=new))
            merged += 1
        else:
            segments = _splice(segments, op.position, 1, None)
            evicted += 1
    return _materialize(
        state, segments, start, brightness, version, ledger, appended, merged, evicted
    )


def _splice(segments: list[_Segment], position: int, width: int, insert: _Segment | None):
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


def _materialize(state, segments, start, brightness, version, ledger, appended, merged, evicted):
    keys_c, vals, toks, origins, bright, metas = [], [], [], [], [], []
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
    moved = positions != origin
    keys = canonical.clone()
    if bool(moved.any()):
        keys[:, :, moved] = rerotate_from_canonical(
            canonical[:, :, moved], origin[moved], positions[moved], g.rope
        )
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
        next_ledger_id=ledger,
        appended=appended,
        merged=merged,
        evicted=evicted,
    )


def commit_staged(state: SessionState, staged: StagedPatch, digest: bytes) -> None:
    """Write a staged patch into the state; on any failure, restore the old rows and re-raise."""
    if staged.version != state.version + 1 or staged.old_row_count != state.row_count:
        raise RuntimeError("staged patch does not follow the current state")
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
        _check_blades(state)
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


def _check_blades(state: SessionState) -> None:
    """Invariant 2: as many mirror entries as rows, each naming the token its row holds."""
    if len(state.meta) != state.row_count:
        raise RuntimeError(f"mirror has {len(state.meta)} entries for {state.row_count} rows")


def apply_ops(state: SessionState, ops: list[Op], version: int, digest: bytes) -> StagedPatch:
    """Validate, stage and commit in one call (replicas replaying the committed log use this)."""
    validate_ops(state, ops)
    staged = stage_ops(state, ops, version)
    commit_staged(state, staged, digest)
    return staged
