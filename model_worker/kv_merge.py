"""The K/V-merge repairer: the pair's two rows become one row, with no forward pass.

The family of CaM (Zhang et al., 2024, "CaM: Cache Merging for Memory-efficient LLMs
Inference"), D2O (Wan et al., 2024, "D2O: Dynamic Discriminative Operations for Efficient
Generative Inference of Large Language Models") and KVMerger (Wang et al., 2024, "Model Tells You
Where to Merge: Adaptive KV Cache Merging for LLMs on Long-Context Tasks"): instead of choosing a
token and recomputing it, combine the cached states themselves.

For the pair (p, p + 1), with weights w_a, w_b normalised to sum 1:
- value = w_a v_a + w_b v_b;
- key (`mean`) = w_a k_a + w_b k_b, both keys rotated to the merged row's position
  position_offset + p first (RoPE makes keys at different positions incomparable until they share
  one), each in one step from its canonical key and origin (DESIGN.md invariant 5); or (`heavier`)
  the heavier row's key, rotated the same way. The result is the canonical key of a row whose
  origin is position_offset + p, which is what ReplacePairOp carries.
- weights (`attention`): the attention the Tick's input token pays the two rows (its reduced
  attention row); `equal`: one half each; or the caller's (PairRef.weights). Weights that sum to
  zero count as equal.
- the token kept in the mirror is the heavier row's own token (the first row's on a tie), and
  the score is the heavier row's share of the weight.
Arithmetic runs in float32, the result is stored in the model's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model_worker.forward import Rows
from model_worker.repair import PairRef, Replacement
from positronic.rope import Rope, rerotate_from_canonical

ATTENTION, EQUAL = "attention", "equal"
MEAN, HEAVIER = "mean", "heavier"


def pair_weights(pair: PairRef, attention: torch.Tensor, how: str) -> tuple[float, float]:
    """(w_a, w_b), summing to 1. attention: [N + 1] the Tick's reduced row over the rows."""
    p = pair.position
    if pair.weights:
        a, b = (float(w) for w in pair.weights)
    elif how == ATTENTION:
        a, b = float(attention[p]), float(attention[p + 1])
    elif how == EQUAL:
        a, b = 1.0, 1.0
    else:
        raise ValueError(f"unknown K/V merge weights {how!r}")
    total = a + b
    return (a / total, b / total) if total > 0 else (0.5, 0.5)


def merge_pairs(
    rows: Rows,
    pairs: Sequence[PairRef],
    attention: torch.Tensor,
    rope: Rope,
    *,
    weights: str = ATTENTION,
    key: str = MEAN,
) -> list[Replacement]:
    """The merged row of each pair."""
    if key not in (MEAN, HEAVIER):
        raise ValueError(f"unknown K/V merge key {key!r}")
    if rows.canonical_keys is None or rows.origin_positions is None:
        raise ValueError("a K/V merge needs the replica's canonical keys and origins")
    out = []
    for pair in pairs:
        p = pair.position
        w_a, w_b = pair_weights(pair, attention, weights)
        target = torch.full((2,), rows.position(p), dtype=torch.int64)
        keys = rerotate_from_canonical(
            rows.canonical_keys[:, :, p : p + 2].float(),
            rows.origin_positions[p : p + 2],
            target,
            rope,
        )  # [L, H, 2, D], both at position_offset + p
        values = rows.values[:, :, p : p + 2].float()
        heavier = 0 if w_a >= w_b else 1
        if key == MEAN:
            merged_key = w_a * keys[:, :, 0:1] + w_b * keys[:, :, 1:2]
        else:
            merged_key = keys[:, :, heavier : heavier + 1]
        merged_value = w_a * values[:, :, 0:1] + w_b * values[:, :, 1:2]
        dtype = rows.values.dtype
        out.append(
            Replacement(
                token_id=int(rows.token_ids[p + heavier]),
                keys=merged_key.to(dtype).contiguous(),
                values=merged_value.to(dtype).contiguous(),
                score=max(w_a, w_b),
            )
        )
    return out
