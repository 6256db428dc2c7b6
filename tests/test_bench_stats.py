"""The bootstrap interval against answers known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from positronic.bench.stats import (
    far_recall_mask,
    gap_closed_ci,
    perplexity,
    ratio_ci,
    running_mean,
)


def test_perplexity_is_exp_mean_nll():
    assert perplexity([math.log(2.0)] * 7) == pytest.approx(2.0)
    assert perplexity([0.0, 2.0]) == pytest.approx(math.e)
    with pytest.raises(ValueError):
        perplexity([])


def test_constant_difference_gives_a_point_interval():
    rng = np.random.default_rng(1)
    ref = [rng.gamma(2.0, 1.0, size=300) for _ in range(3)]
    pol = [r + 0.1 for r in ref]
    r = ratio_ci(pol, ref, block=32, resamples=500)
    assert r.ratio == pytest.approx(math.exp(0.1))
    assert r.lo == pytest.approx(math.exp(0.1)) and r.hi == pytest.approx(math.exp(0.1))


def test_identical_sides_ratio_one():
    ref = [np.linspace(0.5, 3.0, 100)] * 2
    r = ratio_ci(ref, ref)
    assert (r.ratio, r.lo, r.hi) == (1.0, 1.0, 1.0)


def test_iid_differences_match_the_normal_interval():
    """Independent per-token differences, sd 1, n tokens: log-ratio interval ≈ ±1.96/sqrt(n)."""
    rng = np.random.default_rng(7)
    n = 4000
    diff = rng.normal(0.05, 1.0, size=n)
    ref = [np.full(n, 2.0)]
    r = ratio_ci([ref[0] + diff], ref, block=1, resamples=4000, seed=3)
    half = (math.log(r.hi) - math.log(r.lo)) / 2
    assert half == pytest.approx(1.96 / math.sqrt(n), rel=0.1)
    assert math.log(r.ratio) == pytest.approx(diff.mean())
    assert r.lo < r.ratio < r.hi


def test_blocks_keep_correlated_tokens_together():
    """Differences constant within runs of 50 tokens: a per-token bootstrap would be too
    narrow by sqrt(50); blocks of 50 give the interval of 80 independent values."""
    rng = np.random.default_rng(11)
    per_block = rng.normal(0.0, 1.0, size=80)
    diff = np.repeat(per_block, 50)
    ref = np.zeros_like(diff)
    blocks = ratio_ci([diff], [ref], block=50, resamples=4000, seed=5)
    tokens = ratio_ci([diff], [ref], block=1, resamples=4000, seed=5)
    half_blocks = (math.log(blocks.hi) - math.log(blocks.lo)) / 2
    half_tokens = (math.log(tokens.hi) - math.log(tokens.lo)) / 2
    assert half_blocks == pytest.approx(1.96 * per_block.std() / math.sqrt(80), rel=0.15)
    assert half_blocks / half_tokens == pytest.approx(math.sqrt(50), rel=0.25)
    assert "80 blocks of 50 tokens" in blocks.method


def test_deterministic_for_a_seed_and_checks_shapes():
    a = [np.arange(10.0)]
    b = [np.arange(10.0)[::-1].copy()]
    assert ratio_ci(a, b, block=3, seed=2) == ratio_ci(a, b, block=3, seed=2)
    with pytest.raises(ValueError):
        ratio_ci([np.ones(5)], [np.ones(6)])
    with pytest.raises(ValueError):
        ratio_ci([np.ones(5)], [np.ones(5), np.ones(5)])


def test_running_mean():
    np.testing.assert_allclose(running_mean(np.array([1.0, 3.0, 5.0])), [1.0, 2.0, 3.0])


def test_ratio_over_a_subset_of_tokens():
    """A mask keeps only the tokens it marks: the ratio is the one over those tokens."""
    ref = [np.full(100, 2.0), np.full(60, 1.0)]
    pol = [r.copy() for r in ref]
    masks = [np.zeros(100, dtype=bool), np.zeros(60, dtype=bool)]
    masks[0][10:20] = True
    masks[1][::2] = True
    pol[0][10:20] += 0.3  # only masked tokens differ...
    pol[1][::2] += 0.3
    pol[1][1::2] += 5.0  # ...and unmasked ones differ hugely, and must not count
    r = ratio_ci(pol, ref, masks=masks, block=8, resamples=300)
    assert r.ratio == pytest.approx(math.exp(0.3))
    assert r.lo == pytest.approx(math.exp(0.3)) and r.hi == pytest.approx(math.exp(0.3))
    with pytest.raises(ValueError):
        ratio_ci(pol, ref, masks=[np.ones(100, dtype=bool)])
    with pytest.raises(ValueError):
        ratio_ci(pol, ref, masks=[np.zeros(100, dtype=bool), np.zeros(60, dtype=bool)])


def test_gap_closed_by_hand():
    """best at ppl e^2, full at e^1: a policy at ppl (e^2 + e)/2 closes half the gap, the full
    cache itself all of it, the best eviction policy none."""
    best = [np.full(200, 2.0), np.full(80, 2.0)]
    full = [np.full(200, 1.0), np.full(80, 1.0)]
    half = math.log((math.e**2 + math.e) / 2)
    pol = [np.full(200, half), np.full(80, half)]
    g = gap_closed_ci(pol, best, full, block=16, resamples=300)
    assert g.value == pytest.approx(0.5)
    assert g.lo == pytest.approx(0.5) and g.hi == pytest.approx(0.5)
    assert gap_closed_ci(full, best, full).value == pytest.approx(1.0)
    assert gap_closed_ci(best, best, full).value == pytest.approx(0.0)
    worse = [b + 0.1 for b in best]
    assert gap_closed_ci(worse, best, full).value < 0


def test_gap_interval_widens_with_noise_and_covers_the_value():
    rng = np.random.default_rng(3)
    full = [rng.gamma(2.0, 0.5, size=640) for _ in range(4)]
    best = [f + 0.2 for f in full]
    pol = [b - 0.1 + rng.normal(0, 0.3, size=b.size) for b in best]
    g = gap_closed_ci(pol, best, full, block=32, resamples=1000)
    assert g.lo < g.value < g.hi
    assert 0.2 < g.value < 0.8 and g.hi - g.lo > 0.05
    assert "blocks of 32 tokens" in g.method


def test_far_recall_mask():
    bos = 1
    #        0    1  2  3  4  5  6  7  8    9  10 11
    ids = [bos, 5, 6, 7, 5, 8, 6, 5, bos, 5, 9, 5]
    # budget 2: t=4 (5 last at 1, 3 back) far; t=6 (6 last at 2, 4 back) far; t=7 (5 at 4, 3
    # back) far; t=9 is a new story: not far; t=11 (5 at 9, 2 back) not far.
    mask = far_recall_mask(ids, budget=2, bos_id=bos, first=2)
    assert mask.tolist() == [False, False, True, False, True, True, False, False, False, False]
    assert far_recall_mask(ids, budget=3, bos_id=bos).tolist()[4] is True  # 4 back > 3
    assert not far_recall_mask(ids, budget=4, bos_id=bos).any()
