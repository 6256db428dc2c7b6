"""Read-only forward passes over a replica's rows: one batched `run`, and what is built on it.

`run` forwards q new tokens, each at its own rotary position, over the replica's live rows: their
K/V are written in place into the replica's free slots right after the live rows (slot_cache.py)
and a 4-D mask says which rows and new tokens each query sees, so a single pass can hold
tokens with different contexts (Step's input token, a row re-fed at its own position, a repair
candidate at a pair's position). The live rows are never written (DESIGN.md invariant 1).
Positions are always explicit: a token at row index p is computed at rotary position
position_offset + p, where the replica's rows sit (cache_authority/rows.py) — never
`get_seq_length()` (invariant 5).

Rows without slots (a private copy that outlives the replica's lock, hand-made rows in tests)
are copied once into a private buffer with room for the new tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from model_worker.attention import LAST_LAYER, RowRecorder
from model_worker.model import LoadedModel
from model_worker.slot_cache import SlotCache


@dataclass(frozen=True)
class Slots:
    """The buffers a replica's rows sit in: live rows at slots [first, first + N), the slots
    after them free for a forward's new tokens."""

    keys: torch.Tensor  # [L, H, S, D] rotated keys
    values: torch.Tensor  # [L, H, S, D]
    first: int


@dataclass(frozen=True)
class Rows:
    """A read-only context: the first `count` rows of a replica, on the model's device."""

    keys: torch.Tensor  # [L, H, N, D], row i rotated to position position_offset + i
    values: torch.Tensor  # [L, H, N, D]
    token_ids: Sequence[int]  # [N]
    position_offset: int = 0  # rotary position of row 0
    slots: Slots | None = None  # where the rows sit, for in-place forwards; None: copy first
    # A replica's canonical keys [L, H, N, D] and their origin positions [N] (K/V merges).
    canonical_keys: torch.Tensor | None = None
    origin_positions: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return len(self.token_ids)

    def position(self, row: int) -> int:
        """The rotary position of row index `row`."""
        return self.position_offset + row

    def prefix(self, n: int) -> Rows:
        """Rows [0, n), as views (no slots: a forward over them must not write row n)."""
        return Rows(
            self.keys[:, :, :n], self.values[:, :, :n], self.token_ids[:n], self.position_offset
        )

    def detached(self, room: int = 0) -> Rows:
        """A private copy with `room` free slots after the rows, for work that outlives the
        replica's lock (its own forwards may then extend it: `extended`)."""
        shape = (*self.keys.shape[:2], self.count + room, self.keys.shape[3])
        keys = self.keys.new_empty(shape)
        values = self.values.new_empty(shape)
        keys[:, :, : self.count] = self.keys
        values[:, :, : self.count] = self.values
        return Rows(
            keys[:, :, : self.count],
            values[:, :, : self.count],
            list(self.token_ids),
            self.position_offset,
            Slots(keys, values, 0),
        )

    def extended(self, token_ids: Sequence[int]) -> Rows:
        """A private copy's rows plus the tokens its last forward wrote after them."""
        assert self.slots is not None and self.slots.first == 0
        n = self.count + len(token_ids)
        k, v = self.slots.keys[:, :, :n], self.slots.values[:, :, :n]
        return replace(self, keys=k, values=v, token_ids=[*self.token_ids, *token_ids])


@dataclass
class KV:
    keys: torch.Tensor  # [L, H, N, D], in the model's dtype
    values: torch.Tensor  # [L, H, N, D]

    def clone(self) -> KV:
        return KV(self.keys.clone(), self.values.clone())


@dataclass
class Pass:
    """What one batched forward gives back."""

    logits: torch.Tensor  # [k, V] float32, for the queries asked for
    kv: KV  # [L, H, q, D] of the new tokens: views of free slots, valid until the next pass
    attention: torch.Tensor | None  # [N + q] float32: the last query's row, layer-reduced
    forward_ns: int


@dataclass
class StepOutput:
    logits: torch.Tensor  # [V] float32, the next token's logits
    kv: KV  # the input token's K/V, N = 1
    attention: torch.Tensor  # [rows + 1] float32: the input token's row over every row and itself
    position: int  # rotary position the input token was computed at
    forward_ns: int


def causal_mask(count: int, q: int, device: torch.device) -> torch.Tensor:
    """[q, count + q] bool, True attends: every live row, then the new tokens causally."""
    mask = torch.ones(q, count + q, dtype=torch.bool, device=device)
    if q > 1:
        mask[:, count:] = torch.ones(q, q, dtype=torch.bool, device=device).tril()
    return mask


def alone_mask(count: int, contexts: Sequence[int], device: torch.device) -> torch.Tensor:
    """[q, count + q] bool: query i sees rows [0, contexts[i]) and itself, nothing else."""
    q = len(contexts)
    mask = torch.zeros(q, count + q, dtype=torch.bool, device=device)
    idx = torch.arange(q, device=device)
    ends = torch.tensor(list(contexts), dtype=torch.long, device=device)
    mask[:, :count] = torch.arange(count, device=device)[None, :] < ends[:, None]
    mask[idx, count + idx] = True
    return mask


def run(
    lm: LoadedModel,
    rows: Rows,
    token_ids: Sequence[int],
    positions: Sequence[int],
    mask: torch.Tensor | None = None,
    *,
    keep: Sequence[int] | None = None,
    reduction: str | None = None,
) -> Pass:
    """Forward token_ids at rotary positions `positions` over `rows` in one pass.

    mask: [q, N + q] bool (True attends); default: every row, then the new tokens causally.
    keep: query indices whose logits come back (default: the last). reduction: the attention
    row of the last query, reduced over layers this way (None: no row)."""
    t0 = time.perf_counter_ns()
    q = len(token_ids)
    dev = lm.device
    slots = rows.slots
    if slots is None or slots.first + rows.count + q > slots.keys.shape[2]:
        slots = rows.detached(q).slots  # no room in place: a private copy (tests, rare sizes)
        assert slots is not None
    if mask is None and (q > 1 or lm.lean is None):
        mask = causal_mask(rows.count, q, dev)  # one query over everything needs none
    recorder = RowRecorder.for_reduction(reduction, lm.geometry.num_layers) if reduction else None
    kept = torch.tensor(list(keep) if keep is not None else [q - 1], dtype=torch.long, device=dev)
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=dev)
    pos = torch.tensor(list(positions), dtype=torch.long, device=dev)
    with torch.inference_mode():
        if lm.lean is not None:  # the same arithmetic without the library's per-op overhead
            logits, layer_rows = lm.lean.forward(
                ids,
                pos,
                mask,
                slots.keys,
                slots.values,
                slots.first,
                rows.count,
                kept,
                recorder.layers if recorder is not None else frozenset(),
            )
            if recorder is not None:
                recorder.rows.update(layer_rows)
        else:
            assert mask is not None
            cache = SlotCache(slots.keys, slots.values, slots.first, rows.count)
            extra = {"row_recorder": recorder} if recorder is not None else {}
            logits = lm.model(
                input_ids=ids[None],
                position_ids=pos[None],
                attention_mask=mask[None, None],
                cache=cache,
                use_cache=True,
                logits_to_keep=kept,
                **extra,
            ).logits[0]
    start = slots.first + rows.count
    kv = KV(slots.keys[:, :, start : start + q], slots.values[:, :, start : start + q])
    attention = recorder.reduced(reduction).cpu() if recorder and reduction else None
    return Pass(logits.float(), kv, attention, time.perf_counter_ns() - t0)


def step(
    lm: LoadedModel, rows: Rows, input_token_id: int, reduction: str = LAST_LAYER
) -> StepOutput:
    """Forward the input token at row index rows.count over every row."""
    position = rows.position(rows.count)
    out = run(lm, rows, [input_token_id], [position], reduction=reduction)
    assert out.attention is not None
    return StepOutput(out.logits[0].cpu(), out.kv.clone(), out.attention, position, out.forward_ns)


def next_token_logits(lm: LoadedModel, rows: Rows, token_id: int, row: int) -> torch.Tensor:
    """Logits [V] (float32) after `token_id` at row index `row`, over rows [0, row)."""
    mask = alone_mask(rows.count, [row], lm.device)
    return run(lm, rows, [token_id], [rows.position(row)], mask).logits[0]


def compute_kv(lm: LoadedModel, rows: Rows, insertions: Sequence[tuple[int, int]]) -> list[KV]:
    """For each (row index p, token), its K/V at p's position with rows [0, p) as context: one
    pass, each insertion seeing only its own context and itself."""
    if not insertions:
        return []
    mask = alone_mask(rows.count, [p for p, _ in insertions], lm.device)
    tokens = [t for _, t in insertions]
    out = run(lm, rows, tokens, [rows.position(p) for p, _ in insertions], mask)
    return [KV(out.kv.keys[:, :, i : i + 1], out.kv.values[:, :, i : i + 1]).clone()
            for i in range(len(tokens))]  # fmt: skip


def prefill(
    lm: LoadedModel,
    rows: Rows,
    token_ids: Sequence[int],
    start: int,
    chunk_tokens: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[int, KV]]:
    """K/V of token_ids at row indices start.. over rows [0, start), forwarded chunk_tokens at a
    time; yields (index of the chunk's first token, its K/V) per chunk."""
    if chunk_tokens <= 0:
        raise ValueError("chunk_tokens must be positive")
    context = rows.prefix(start).detached(len(token_ids))
    total = len(token_ids)
    for first in range(0, total, chunk_tokens):
        chunk = list(token_ids[first : first + chunk_tokens])
        p0 = context.position(context.count)
        out = run(lm, context, chunk, range(p0, p0 + len(chunk)), keep=[])
        yield first, out.kv.clone()
        context = context.extended(chunk)
        if progress is not None:
            progress(first + len(chunk), total)


def alternatives_logits(
    lm: LoadedModel, rows: Rows, position: int, token_ids: Sequence[int]
) -> torch.Tensor:
    """Next-token logits [K, V] (float32) of K alternative tokens, each placed alone at row
    index `position` over rows [0, position): one forward whose mask lets each alternative see
    the context and itself only (a batch of K would copy the context K times)."""
    k = len(token_ids)
    mask = alone_mask(rows.count, [position] * k, lm.device)
    out = run(lm, rows, token_ids, [rows.position(position)] * k, mask, keep=range(k))
    return out.logits
