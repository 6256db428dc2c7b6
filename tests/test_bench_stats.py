"""The bootstrap interval against answers known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from positronic.bench.stats import perplexity, ratio_ci, running_mean


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
