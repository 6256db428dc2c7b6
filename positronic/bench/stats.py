"""Perplexity ratios and gap fractions with paired block-bootstrap confidence intervals.

Method (stated in every JSON this writes): each stream's per-token NLL differences
d = nll_policy - nll_reference are cut into consecutive blocks of `block` tokens (the last,
shorter block of a stream is kept); the blocks of all streams are pooled and resampled with
replacement, `resamples` times, same blocks for policy and reference (paired). Each resample gives
exp(sum d / tokens) — the ratio of the two perplexities over the resampled tokens — and the
interval is the 2.5th and 97.5th percentile of those ratios. Blocks keep the correlation between
neighbouring tokens inside a resample, which a per-token bootstrap would throw away.

Both statistics can be restricted to a subset of the tokens (a mask per stream, e.g. the
far-recall tokens): blocks are still cut from consecutive tokens of the whole stream, and each
block contributes its masked tokens only, so the subset keeps the streams' block structure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_BLOCK = 64
DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class RatioCI:
    ratio: float  # perplexity(policy) / perplexity(reference) over every token
    lo: float
    hi: float
    method: str


def perplexity(nll: Sequence[float] | np.ndarray) -> float:
    arr = np.asarray(nll, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no tokens to score")
    return math.exp(float(arr.mean()))


def _blocks(
    diffs: Sequence[np.ndarray], block: int, masks: Sequence[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per block: the sum of its (masked) differences and its (masked) token count.

    diffs: per stream [T] or [K, T] (K quantities summed side by side); masks: per stream [T].
    Returns sums [blocks] or [blocks, K], counts [blocks].
    """
    sums, counts = [], []
    for i, d in enumerate(diffs):
        m = np.ones(d.shape[-1], dtype=bool) if masks is None else masks[i]
        for a in range(0, d.shape[-1], block):
            keep = m[a : a + block]
            sums.append(d[..., a : a + block][..., keep].sum(axis=-1))
            counts.append(keep.sum())
    return np.asarray(sums), np.asarray(counts, dtype=np.float64)


def _paired(
    sides: Sequence[Sequence[Sequence[float]]], masks: Sequence[Sequence[bool]] | None
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Per stream, the sides stacked [K, T] (checked equal length), and the masks as arrays."""
    n = len(sides[0])
    if n == 0 or any(len(s) != n for s in sides):
        raise ValueError("need the same, non-zero number of streams on every side")
    stacked = []
    for i in range(n):
        arrs = [np.asarray(s[i], dtype=np.float64) for s in sides]
        if len({a.shape for a in arrs}) != 1 or arrs[0].ndim != 1:
            sizes = ", ".join(str(a.size) for a in arrs)
            raise ValueError(f"stream {i} scores different numbers of tokens: {sizes}")
        stacked.append(np.stack(arrs))
    if masks is None:
        return stacked, None
    if len(masks) != n:
        raise ValueError(f"{len(masks)} masks for {n} streams")
    marr = [np.asarray(m, dtype=bool) for m in masks]
    for i, (m, s) in enumerate(zip(marr, stacked, strict=True)):
        if m.shape != s.shape[1:]:
            raise ValueError(f"stream {i}: mask of {m.size} tokens for {s.shape[1]}")
    return stacked, marr


def _method(blocks: int, block: int, streams: int, resamples: int, level: float) -> str:
    return (
        f"paired block bootstrap: {blocks} blocks of {block} tokens pooled over "
        f"{streams} streams, {resamples} resamples, percentile {level:.0%} interval"
    )


def _resample(blocks: int, resamples: int, seed: int) -> np.ndarray:
    if resamples < 1:
        raise ValueError("block and resamples must be positive")
    rng = np.random.default_rng(seed)
    return rng.integers(0, blocks, size=(resamples, blocks))  # [R, blocks]


def ratio_ci(
    policy: Sequence[Sequence[float]],
    reference: Sequence[Sequence[float]],
    *,
    masks: Sequence[Sequence[bool]] | None = None,
    block: int = DEFAULT_BLOCK,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> RatioCI:
    """Ratio of perplexities (policy over reference) and its paired block-bootstrap interval.

    policy, reference: per stream, the NLL of the same tokens (equal lengths stream by stream);
    masks: per stream, which of those tokens count (all when None).
    """
    stacked, marr = _paired([policy, reference], masks)
    if block < 1:
        raise ValueError("block and resamples must be positive")
    sums, counts = _blocks([s[0] - s[1] for s in stacked], block, marr)
    if counts.sum() == 0:
        raise ValueError("no tokens to score")
    ratio = math.exp(sums.sum() / counts.sum())
    picks = _resample(sums.size, resamples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = np.exp(sums[picks].sum(axis=1) / counts[picks].sum(axis=1))
    alpha = (1.0 - level) / 2.0
    lo, hi = np.nanquantile(boot, [alpha, 1.0 - alpha])
    return RatioCI(
        ratio, float(lo), float(hi), _method(sums.size, block, len(stacked), resamples, level)
    )


@dataclass(frozen=True)
class GapCI:
    value: float  # (ppl_best - ppl_policy) / (ppl_best - ppl_full); 1 = the whole gap closed
    lo: float
    hi: float
    method: str


def gap_closed_ci(
    policy: Sequence[Sequence[float]],
    best: Sequence[Sequence[float]],
    full: Sequence[Sequence[float]],
    *,
    masks: Sequence[Sequence[bool]] | None = None,
    block: int = DEFAULT_BLOCK,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> GapCI:
    """The share of the perplexity gap between `best` (an eviction policy) and `full` (the full
    cache) that `policy` closes, over the same tokens, with a paired block-bootstrap interval
    (the three sides resampled with the same blocks). Negative: worse than `best`; above 1:
    better than the full cache. NaN when the gap is zero."""
    stacked, marr = _paired([policy, best, full], masks)
    if block < 1:
        raise ValueError("block and resamples must be positive")
    sums, counts = _blocks(stacked, block, marr)  # [blocks, 3], [blocks]
    if counts.sum() == 0:
        raise ValueError("no tokens to score")

    def gap(s: np.ndarray, c: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            ppl = np.exp(s / c[..., None])  # [..., 3]: policy, best, full
            return (ppl[..., 1] - ppl[..., 0]) / (ppl[..., 1] - ppl[..., 2])

    value = float(gap(sums.sum(axis=0), counts.sum()))
    picks = _resample(counts.size, resamples, seed)
    boot = gap(sums[picks].sum(axis=1), counts[picks].sum(axis=1))  # [R]
    alpha = (1.0 - level) / 2.0
    finite = boot[np.isfinite(boot)]
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha]) if finite.size else (math.nan, math.nan)
    return GapCI(
        value, float(lo), float(hi), _method(counts.size, block, len(stacked), resamples, level)
    )


def far_recall_mask(
    token_ids: Sequence[int], budget: int, bos_id: int, first: int = 2
) -> np.ndarray:
    """Which predicted tokens token_ids[first:] are far recalls: the same id occurred earlier in
    the same story (stories start at BOS), and its latest earlier occurrence is more than
    `budget` tokens back — outside any window of the budget, so only what a policy kept of older
    context can help predict it. Returns bool [len(token_ids) - first]."""
    last_seen: dict[int, int] = {}
    out = np.zeros(max(0, len(token_ids) - first), dtype=bool)
    for t, tok in enumerate(token_ids):
        if tok == bos_id:
            last_seen = {}
        elif t >= first and tok in last_seen and t - last_seen[tok] > budget:
            out[t - first] = True
        last_seen[tok] = t
    return out


def running_mean(nll: np.ndarray) -> np.ndarray:
    """Cumulative mean along the last axis: [..., T] -> [..., T]."""
    return np.cumsum(nll, axis=-1) / np.arange(1, nll.shape[-1] + 1)
