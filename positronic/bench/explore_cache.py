"""The simulator's cache: the rows of B sessions side by side, edited directly, with the loop's
semantics.

What the authority keeps (cache_authority/stage.py), per session: each row's token, canonical key
(as computed at its origin position), origin, value, and its key rotated to the row's index;
edits are applied from the highest position down and every row that moved is re-rotated from
its canonical key in one step (DESIGN.md invariant 5, `positronic.rope`). The forward of the
input tokens is the worker's (model_worker/forward.py: a fresh DynamicCache aliasing the rows,
position = row count, the registered sdpa-with-row attention), batched over the B sessions —
every policy keeps exactly `budget` rows, so the sessions of one budget have equal row counts at
every tick and one forward serves them all.

Besides what the authority keeps, the simulator tracks what a search may score rows by: tokens
represented (a merged row stands for the sum of its pair's), attention accumulated since the
row was made, and, optionally, an additive attention bias of log(tokens represented) per row
(ToMe's "proportional attention", Bolya et al., 2023), which no service implements today.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_worker.forward import Rows
from model_worker.model import LoadedModel
from positronic.rope import Rope


def fresh_cache(lm: LoadedModel, rows: Rows):
    """A DynamicCache whose layers alias `rows` (no copy), for one forward of the simulator (the
    worker itself forwards in place over its live replica's slots instead)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    if rows.count:
        for i, layer in enumerate(cache.layers):
            k = rows.keys[i].unsqueeze(0)  # [1, H, N, D] (or [1, B, H, N, D] when batched)
            v = rows.values[i].unsqueeze(0)
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
    return cache


@dataclass
class StepResult:
    logits: torch.Tensor  # [V] float32: the next token's logits
    keys: torch.Tensor  # [L, H, 1, D] the input token's key at position = row count
    values: torch.Tensor  # [L, H, 1, D]
    per_layer: torch.Tensor  # [L, S + 1]: the input token's attention, mean over query heads
    per_head: torch.Tensor  # [L, H, S + 1]: mean over each KV head's query group, per layer
    attention: torch.Tensor  # [S + 1]: per_layer reduced as the session asked


def reduce_layers(per_layer: torch.Tensor, how: str) -> torch.Tensor:
    """[L, S + 1] (already the mean over query heads) -> [S + 1], as attention.reduce_rows."""
    if how == "last":
        return per_layer[-1]
    if how == "mean":
        return per_layer.mean(dim=0)
    if how == "max":
        return per_layer.max(dim=0).values
    raise ValueError(f"unknown layer reduction {how!r}")


class RotationTable:
    """cos/sin of every offset in [-span, span], computed as `positronic.rope.rotate_keys` does
    (float64 angles, then float32), so a rotation through the table is bit-identical to it."""

    def __init__(self, rope: Rope, span: int):
        offsets = torch.arange(-span, span + 1, dtype=torch.float64)
        angles = offsets[:, None] * rope.inv_freq.to(torch.float64)[None, :]
        self.cos = angles.cos().to(torch.float32)  # [2 span + 1, D/2]
        self.sin = angles.sin().to(torch.float32)
        self.span = span

    def rotate(self, keys: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """keys [..., S, D] by offsets [S] (|offset| <= span), in keys' dtype."""
        cos, sin = self.cos[offsets + self.span], self.sin[offsets + self.span]  # [S, D/2]
        k = keys.to(torch.float32)
        half = k.shape[-1] // 2
        k1, k2 = k[..., :half], k[..., half:]
        return torch.cat((k1 * cos - k2 * sin, k2 * cos + k1 * sin), dim=-1).to(keys.dtype)


class BatchCache:
    """B sessions' rows in preallocated buffers [L, B, H, capacity, D]; row count S shared."""

    def __init__(
        self,
        lm: LoadedModel,
        batch: int,
        capacity: int,
        stream_tokens: int,
        bias_caps: list[float] | None = None,
    ):
        g = lm.geometry
        self.table = RotationTable(g.rope, stream_tokens + capacity)
        shape = (g.num_layers, batch, g.num_kv_heads, capacity, g.head_dim)
        self.lm, self.batch = lm, batch
        # Per session: the largest additive bias log(count) may reach; 0 = no bias. With no
        # session biased, the forward runs without a mask (exactly the worker's Step).
        caps = torch.tensor(bias_caps or [0.0] * batch, dtype=torch.float32)
        self.bias_caps = caps if bool((caps > 0).any()) else None
        self.canonical = torch.zeros(shape, dtype=g.dtype)
        self.keys = torch.zeros(shape, dtype=g.dtype)
        self.values = torch.zeros(shape, dtype=g.dtype)
        self.origin = torch.zeros(batch, capacity, dtype=torch.long)
        self.count = torch.ones(batch, capacity)  # tokens each row represents
        self.accumulated = torch.zeros(batch, capacity)  # attention received since made
        self.token_ids: list[list[int]] = [[] for _ in range(batch)]
        self.structural: list[list[bool]] = [[] for _ in range(batch)]
        self.size = 0

    def rows(self, b: int) -> Rows:
        """Session b's rows as the worker's read-only context (views)."""
        s = self.size
        return Rows(self.keys[:, b, :, :s], self.values[:, b, :, :s], self.token_ids[b])

    # -- reads -----------------------------------------------------------------------------
    def step(self, tokens: list[int], reductions: list[str]) -> list[StepResult]:
        """Forward each session's input token at position S over its rows (the worker's Step)."""
        lm, n, b = self.lm, self.size, self.batch
        cache = fresh_cache(lm, Rows(self.keys[:, :, :, :n], self.values[:, :, :, :n], [0] * n))
        if n:  # fresh_cache adds a batch axis of 1 to [B, H, S, D]: drop it
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[0], layer.values[0]
        ids = torch.tensor(tokens, dtype=torch.long)[:, None]
        pos = torch.full((b, 1), n, dtype=torch.long)
        mask = None
        if self.bias_caps is not None:
            mask = torch.zeros(b, 1, 1, n + 1, dtype=lm.dtype)
            bias = torch.minimum(self.count[:, :n].clamp(min=1.0).log(), self.bias_caps[:, None])
            mask[:, 0, 0, :n] = bias.to(lm.dtype)
        with torch.inference_mode():
            out = lm.model(
                input_ids=ids,
                cache=cache,
                position_ids=pos,
                attention_mask=mask,
                use_cache=True,
                output_attentions=True,
                logits_to_keep=1,
            )
        keys = torch.stack([layer.keys[:, :, -1:] for layer in out.cache.layers])  # [L,B,H,1,D]
        values = torch.stack([layer.values[:, :, -1:] for layer in out.cache.layers])
        h = keys.shape[2]
        # per layer [B, nH, 1, S + 1] -> [B, L, nH, S + 1]
        rows = torch.stack([r[:, :, -1, :].float() for r in out.attentions], dim=1)
        per_head = rows.reshape(b, rows.shape[1], h, -1, n + 1).mean(dim=3)  # [B, L, H, S + 1]
        per_layer = rows.mean(dim=2)  # [B, L, S + 1]
        logits = out.logits[:, -1].float()
        return [
            StepResult(
                logits=logits[i],
                keys=keys[:, i],
                values=values[:, i],
                per_layer=per_layer[i],
                per_head=per_head[i],
                attention=reduce_layers(per_layer[i], reductions[i]),
            )
            for i in range(b)
        ]

    # -- writes: the patch of one tick ------------------------------------------------------
    def append(
        self, tokens: list[int], steps: list[StepResult], computed_at: int, structural=False
    ) -> None:
        """Each session's input row at index S. Its K/V were computed at position `computed_at`
        (the row count before this tick's edits); when edits removed rows, its key is rotated
        to its index, as the patch engine does for an Append after an Evict or a ReplacePair."""
        s = self.size
        keys = torch.stack([r.keys[:, :, 0] for r in steps], dim=1)  # [L, B, H, D]
        self.canonical[:, :, :, s] = keys
        offset = torch.tensor([s - computed_at])
        self.keys[:, :, :, s] = self.table.rotate(keys[..., None, :], offset)[..., 0, :]
        self.values[:, :, :, s] = torch.stack([r.values[:, :, 0] for r in steps], dim=1)
        self.origin[:, s] = computed_at
        self.count[:, s] = 1.0
        self.accumulated[:, s] = 0.0
        for b, tok in enumerate(tokens):
            self.token_ids[b].append(tok)
            self.structural[b].append(structural)
        self.size = s + 1

    def edit(
        self,
        b: int,
        merges: dict[int, tuple[int, torch.Tensor, torch.Tensor]],
        evictions: list[int],
    ) -> int:
        """Session b: replace each pair (p, p + 1) of `merges` by one row (token, key at p,
        value: [L, H, 1, D]) and drop each row of `evictions` — positions name the rows before
        the edit, applied from the highest down as the patch engine does. Returns the session's
        new row count; `resize` then checks that every session has the same."""
        s = self.size
        if not merges and not evictions:
            return s
        start = min([*merges, *evictions])
        # The new tail [start, ...): old row indices, or a merged row (marked by -1 - p).
        tail = list(range(start, s))
        toks, flags = self.token_ids[b], self.structural[b]
        for p, kind in sorted([(p, 0) for p in merges] + [(p, 1) for p in evictions])[::-1]:
            i = p - start
            if kind == 0:
                tail[i : i + 2] = [-1 - p]
                toks[p : p + 2] = [merges[p][0]]
                flags[p : p + 2] = [False]
            else:
                del tail[i]
                del toks[p], flags[p]
        t = len(tail)
        old = torch.tensor([max(i, 0) for i in tail], dtype=torch.long)
        canon = self.canonical[:, b, :, old]  # [L, H, T, D] (copies)
        values = self.values[:, b, :, old]
        origin = self.origin[b, old]
        count, acc = self.count[b, old], self.accumulated[b, old]
        for j, i in enumerate(tail):
            if i < 0:
                p = -1 - i
                _, k, v = merges[p]
                canon[:, :, j], values[:, :, j], origin[j] = k[:, :, 0], v[:, :, 0], p
                count[j] = self.count[b, p] + self.count[b, p + 1]
                acc[j] = self.accumulated[b, p] + self.accumulated[b, p + 1]
        positions = torch.arange(start, start + t)
        self.canonical[:, b, :, start : start + t] = canon
        self.values[:, b, :, start : start + t] = values
        self.keys[:, b, :, start : start + t] = self.table.rotate(canon, positions - origin)
        self.origin[b, start : start + t] = origin
        self.count[b, start : start + t] = count
        self.accumulated[b, start : start + t] = acc
        return start + t

    def resize(self, sizes: list[int]) -> None:
        """After every session's edit of the tick: the shared row count."""
        if len(set(sizes)) != 1:
            raise RuntimeError(f"sessions disagree on their row counts after a tick: {sizes}")
        self.size = sizes[0]


def nll(logits: torch.Tensor, target: int) -> float:
    """-log p(target) under `logits` [V], as the worker reports a forced token's log-prob."""
    return -float(logits.log_softmax(dim=-1)[target])
