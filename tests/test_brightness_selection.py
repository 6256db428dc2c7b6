"""Brightness update and pair/eviction selection against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from positronic.brightness import USER_DEFAULTS, BrightnessParams, update_brightness
from positronic.selection import protected_mask, select_evictions, select_pairs


def test_user_defaults():
    assert (USER_DEFAULTS.seed, USER_DEFAULTS.decay, USER_DEFAULTS.gain, USER_DEFAULTS.max) == (
        255.0,
        2.0,
        10.0,
        255.0,
    )


def test_update_by_hand():
    b = torch.tensor([255.0, 100.0, 1.0, 0.0, 250.0])
    a = torch.tensor([0.5, 0.0, 0.05, 0.3, 1.0])
    # 255-2+5=258->255; 100-2=98; 1-2+0.5=-0.5->0; 0-2+3=1; 250-2+10=258->255
    out = update_brightness(b, a)
    assert out.tolist() == pytest.approx([255.0, 98.0, 0.0, 1.0, 255.0])
    assert b.tolist() == [255.0, 100.0, 1.0, 0.0, 250.0]  # pure: input untouched


def test_update_with_custom_params():
    p = BrightnessParams(seed=10.0, decay=0.5, gain=100.0, max=50.0)
    out = update_brightness(torch.tensor([10.0, 49.0]), torch.tensor([0.1, 0.2]), p)
    assert out.tolist() == pytest.approx([19.5, 50.0])


def test_update_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        update_brightness(torch.zeros(3), torch.zeros(4))


@pytest.mark.parametrize("bad", [dict(decay=-1), dict(seed=300), dict(max=0), dict(gain=-2)])
def test_params_are_validated(bad):
    with pytest.raises(ValueError):
        BrightnessParams(**bad)


def test_protected_mask():
    structural = torch.tensor([True, False, False, False, False])
    assert protected_mask(structural, 2).tolist() == [True, False, False, True, True]
    assert protected_mask(structural, 0).tolist() == [True, False, False, False, False]


def test_select_pairs_lowest_max_brightness():
    #            0(BOS) 1    2    3    4    5    6    7
    s = torch.tensor([0.0, 9.0, 3.0, 4.0, 1.0, 8.0, 0.0, 0.0])
    prot = protected_mask(torch.tensor([True] + [False] * 7), 2)
    # pair maxima (unprotected): (1,2)=9 (2,3)=4 (3,4)=4 (4,5)=8 ; (0,1),(5,6),(6,7) protected
    assert select_pairs(s, prot, 1) == [2]  # tie 4 vs 4 -> lower position
    assert select_pairs(s, prot, 2) == [2, 4]  # (3,4) overlaps (2,3); next is (4,5)=8
    assert select_pairs(s, prot, 5) == [2, 4]  # (1,2) overlaps (2,3): only two fit


def test_select_pairs_never_touches_structural_or_recent():
    s = torch.zeros(6)
    structural = torch.tensor([True, False, False, True, False, False])
    prot = protected_mask(structural, 2)  # protects 0, 3, 4, 5
    assert select_pairs(s, prot, 3) == [1]
    assert select_pairs(torch.zeros(1), torch.zeros(1, dtype=torch.bool), 1) == []


def test_select_evictions():
    s = torch.tensor([0.0, 5.0, 1.0, 1.0, 0.5, 0.0])
    prot = protected_mask(torch.tensor([True, False, False, False, False, False]), 1)
    assert select_evictions(s, prot, 1) == [4]
    assert select_evictions(s, prot, 3) == [2, 3, 4]
    assert select_evictions(s, prot, 0) == []


def test_balanced_pairs_merge_the_fewest_tokens_first():
    from positronic.selection import select_balanced_pairs

    counts = torch.tensor([1.0, 4.0, 4.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    protected = protected_mask(torch.tensor([True] + [False] * 7), 2)
    # Pairs (1,2)=8 (2,3)=6 (3,4)=3 (4,5)=2; (5,6) and later touch the recent window.
    assert select_balanced_pairs(counts, protected, 1) == [4]
    assert select_balanced_pairs(counts, protected, 2) == [2, 4]  # (3,4) overlaps (4,5)
    assert select_balanced_pairs(counts, protected, 1, cap=1.0) == []  # every pair is over cap
    assert select_balanced_pairs(counts, protected, 3, cap=6.0) == [2, 4]


def test_redundant_pairs_are_the_most_alike_at_one_position():
    """Rows 2 and 3 hold the same token's K/V computed at positions 2 and 3: once row 3's key
    is rotated back one position they are identical, so that pair is the most alike."""
    from positronic.rope import Rope, rotate_keys
    from positronic.selection import select_redundant_pairs

    torch.manual_seed(0)
    rope = Rope.from_theta(8)
    canonical = torch.randn(2, 2, 6, 8)  # [L, H, S, D] at position 0
    canonical[:, :, 3] = canonical[:, :, 2]
    values = torch.randn(2, 2, 6, 8)
    values[:, :, 3] = values[:, :, 2]
    keys = rotate_keys(canonical, torch.arange(6), rope)  # each row at its index
    protected = torch.zeros(6, dtype=torch.bool)
    assert select_redundant_pairs(keys, values, protected, 1, rope) == [2]
    protected[3] = True
    assert select_redundant_pairs(keys, values, protected, 1, rope) != [2]
