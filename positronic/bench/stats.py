"""Perplexity ratios with a paired block-bootstrap confidence interval.

Method (stated in every JSON this writes): each stream's per-token NLL differences
d = nll_policy - nll_reference are cut into consecutive blocks of `block` tokens (the last,
shorter block of a stream is kept); the blocks of all streams are pooled and resampled with
replacement, `resamples` times, same blocks for policy and reference (paired). Each resample gives
exp(sum d / tokens) — the ratio of the two perplexities over the resampled tokens — and the
interval is the 2.5th and 97.5th percentile of those ratios. Blocks keep the correlation between
neighbouring tokens inside a resample, which a per-token bootstrap would throw away.
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


def _blocks(diffs: Sequence[np.ndarray], block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block: the sum of its differences and its token count."""
    sums, counts = [], []
    for d in diffs:
        for a in range(0, d.size, block):
            part = d[a : a + block]
            sums.append(part.sum())
            counts.append(part.size)
    return np.asarray(sums), np.asarray(counts, dtype=np.float64)


def ratio_ci(
    policy: Sequence[Sequence[float]],
    reference: Sequence[Sequence[float]],
    *,
    block: int = DEFAULT_BLOCK,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> RatioCI:
    """Ratio of perplexities (policy over reference) and its paired block-bootstrap interval.

    policy, reference: per stream, the NLL of the same tokens (equal lengths stream by stream).
    """
    if len(policy) != len(reference) or not policy:
        raise ValueError("need the same, non-zero number of streams on both sides")
    diffs = []
    for p, r in zip(policy, reference, strict=True):
        pa, ra = np.asarray(p, dtype=np.float64), np.asarray(r, dtype=np.float64)
        if pa.shape != ra.shape:
            raise ValueError(
                f"a stream scores {pa.size} tokens on one side, {ra.size} on the other"
            )
        diffs.append(pa - ra)
    if block < 1 or resamples < 1:
        raise ValueError("block and resamples must be positive")
    sums, counts = _blocks(diffs, block)
    ratio = math.exp(sums.sum() / counts.sum())
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, sums.size, size=(resamples, sums.size))  # [R, blocks]
    boot = np.exp(sums[picks].sum(axis=1) / counts[picks].sum(axis=1))
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    method = (
        f"paired block bootstrap: {sums.size} blocks of {block} tokens pooled over "
        f"{len(diffs)} streams, {resamples} resamples, percentile {level:.0%} interval"
    )
    return RatioCI(ratio, float(lo), float(hi), method)


def running_mean(nll: np.ndarray) -> np.ndarray:
    """Cumulative mean along the last axis: [..., T] -> [..., T]."""
    return np.cumsum(nll, axis=-1) / np.arange(1, nll.shape[-1] + 1)
