"""Read-only forward passes over a replica's rows: prefill, step, compute_kv.

Every call wraps the rows in a fresh DynamicCache whose layers point at the replica's tensors
(zero-copy); the forward replaces those layers with `torch.cat` results, so the replica's own
tensors are never written (NOTES-transformers5.md). Positions are always explicit: a token at
row index p is computed at rotary position position_offset + p, where the replica's rows sit
(cache_authority/rows.py) — never `get_seq_length()` (DESIGN.md invariant 5).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from model_worker.attention import LAST_LAYER, reduce_rows
from model_worker.model import LoadedModel


@dataclass(frozen=True)
class Rows:
    """A read-only context: the first `count` rows of a replica, on the model's device."""

    keys: torch.Tensor  # [L, H, N, D], row i rotated to position position_offset + i
    values: torch.Tensor  # [L, H, N, D]
    token_ids: Sequence[int]  # [N]
    position_offset: int = 0  # rotary position of row 0

    @property
    def count(self) -> int:
        return len(self.token_ids)

    def position(self, row: int) -> int:
        """The rotary position of row index `row`."""
        return self.position_offset + row

    def prefix(self, n: int) -> Rows:
        """Rows [0, n), as views."""
        return Rows(
            self.keys[:, :, :n], self.values[:, :, :n], self.token_ids[:n], self.position_offset
        )

    def detached(self) -> Rows:
        """A private copy, for work that outlives the replica's lock."""
        return Rows(
            self.keys.clone(), self.values.clone(), list(self.token_ids), self.position_offset
        )


@dataclass
class KV:
    keys: torch.Tensor  # [L, H, N, D], in the model's dtype
    values: torch.Tensor  # [L, H, N, D]


@dataclass
class StepOutput:
    logits: torch.Tensor  # [V] float32, the next token's logits
    kv: KV  # the input token's K/V, N = 1
    attention: torch.Tensor  # [rows + 1] float32: the input token's row over every row and itself
    position: int  # rotary position the input token was computed at
    forward_ns: int


def fresh_cache(lm: LoadedModel, rows: Rows):
    """A DynamicCache whose layers alias `rows` (no copy). Used for one call only."""
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    if rows.count:
        for i, layer in enumerate(cache.layers):
            k = rows.keys[i].unsqueeze(0)  # [1, H, N, D]
            v = rows.values[i].unsqueeze(0)
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
    return cache


def _forward(lm: LoadedModel, cache, token_ids: Sequence[int], start: int, want_rows: bool):
    """One forward of `token_ids` at rotary positions start.. over `cache` (which it extends)."""
    dev = lm.device
    ids = torch.tensor([list(token_ids)], dtype=torch.long, device=dev)
    pos = torch.arange(start, start + len(token_ids), dtype=torch.long, device=dev)[None]
    with torch.inference_mode():
        return lm.model(
            input_ids=ids,
            cache=cache,
            position_ids=pos,
            use_cache=True,
            output_attentions=want_rows,
            logits_to_keep=1,
        )


def _new_kv(cache, n: int) -> KV:
    """The last n entries of every layer, copied out: [L, H, n, D]."""
    keys = torch.stack([layer.keys[0, :, -n:] for layer in cache.layers])
    values = torch.stack([layer.values[0, :, -n:] for layer in cache.layers])
    return KV(keys, values)


def step(
    lm: LoadedModel, rows: Rows, input_token_id: int, reduction: str = LAST_LAYER
) -> StepOutput:
    """Forward the input token at row index rows.count over every row."""
    t0 = time.perf_counter_ns()
    cache = fresh_cache(lm, rows)
    position = rows.position(rows.count)
    out = _forward(lm, cache, [input_token_id], position, want_rows=True)
    kv = _new_kv(out.cache, 1)
    attention = reduce_rows(out.attentions, reduction).cpu()
    logits = out.logits[0, -1].float().cpu()
    return StepOutput(logits, kv, attention, position, time.perf_counter_ns() - t0)


def next_token_logits(lm: LoadedModel, rows: Rows, token_id: int, row: int) -> torch.Tensor:
    """Logits [V] (float32) after `token_id` at row index `row`, over rows [0, row)."""
    out = _forward(lm, fresh_cache(lm, rows.prefix(row)), [token_id], rows.position(row), False)
    return out.logits[0, -1].float()


def compute_kv(lm: LoadedModel, rows: Rows, insertions: Sequence[tuple[int, int]]) -> list[KV]:
    """For each (row index p, token), its K/V at p's position with rows [0, p) as context."""
    result = []
    for row, token_id in insertions:
        cache = fresh_cache(lm, rows.prefix(row))
        out = _forward(lm, cache, [token_id], rows.position(row), want_rows=False)
        result.append(_new_kv(out.cache, 1))
    return result


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
    cache = fresh_cache(lm, rows.prefix(start))
    total = len(token_ids)
    for first in range(0, total, chunk_tokens):
        chunk = token_ids[first : first + chunk_tokens]
        out = _forward(lm, cache, chunk, rows.position(start + first), want_rows=False)
        cache = out.cache
        yield first, _new_kv(cache, len(chunk))
        if progress is not None:
            progress(first + len(chunk), total)


def alternatives_logits(
    lm: LoadedModel, rows: Rows, position: int, token_ids: Sequence[int]
) -> torch.Tensor:
    """Next-token logits [K, V] (float32) of K alternative tokens, each placed alone at row
    index `position` over rows [0, position): one forward whose mask lets each alternative see
    the context and itself only (a batch of K would copy the context K times)."""
    k = len(token_ids)
    dev = lm.device
    mask = torch.zeros(1, 1, k, position + k, dtype=torch.bool, device=dev)  # True attends
    mask[..., :position] = True
    idx = torch.arange(k, device=dev)
    mask[0, 0, idx, position + idx] = True
    ids = torch.tensor([list(token_ids)], dtype=torch.long, device=dev)
    pos = torch.full((1, k), rows.position(position), dtype=torch.long, device=dev)
    with torch.inference_mode():
        out = lm.model(
            input_ids=ids,
            cache=fresh_cache(lm, rows.prefix(position)),
            position_ids=pos,
            attention_mask=mask,
            use_cache=True,
        )
    return out.logits[0].float()
