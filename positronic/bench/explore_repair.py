"""Repairers the search compares: what replaces an adjacent pair (p, p + 1) in the simulator.

- `lm`: the worker's repairer as it ships (model_worker/lm_repair.py: the pair's own tokens and
  the 32 most likely under p(x | rows < p), ranked by log p(x | left) + log p(next | left, x)),
  then the worker's ComputeKV of the winner at p — the Tick's choice and K/V (it takes them from
  its scoring pass), as tests/test_bench_explore.py checks per token.
- `pair`: pair-aware. The pair's own tokens are always candidates (plus, optionally, the `pool`
  most likely tokens after the left context); each candidate x is placed alone at p over rows
  < p, and scored on what the merged row must preserve: how well it lets the model continue as
  the pair did — −KL(p(· | left, a, b) ‖ p(· | left, x)), or log p(c | left, x) for the token c
  after the pair — minus `kv_weight` × how far x's K/V at p are from the pair's mean K/V at p
  (relative squared distance over every layer). One batched forward scores every candidate and
  gives the winner's K/V; `pool` > 0 costs one more (the left context's distribution). Without
  a pool (or prior) it is the worker's `pair_lm` repairer itself (model_worker/pair_repair.py),
  which the `halo-pair` preset runs in the services' Tick.
- `kv`: K/V-space merging, no forward pass (the K/V-merging family: CaM, Zhang et al., 2024,
  "CaM: Cache Merging for Memory-efficient LLMs Inference"; D2O, Wan et al., 2024; KVMerger,
  Wang et al., 2024, "Model Tells You Where to Merge"): value = weighted mean of the two values;
  key = weighted mean of both keys rotated to p (RoPE makes keys at different positions
  incomparable until they share one), or the heavier row's key. Weights: this tick's attention
  (the reduced row, or per layer and KV head), attention accumulated since each row was made,
  tokens represented, or equal. The mirror keeps the heavier row's token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_worker.forward import Rows, compute_kv, next_token_logits
from model_worker.lm_repair import LMRepairer
from model_worker.model import LoadedModel
from model_worker.pair_repair import PairLMRepairer
from model_worker.repair import PairRef
from positronic.bench.explore_cache import BatchCache, StepResult, fresh_cache
from positronic.rope import rotate_keys

WEIGHTS = ("attention", "attention_lh", "accumulated", "count", "equal")
KEYS = ("mean", "heavier")
CONTINUATIONS = ("kl", "next")


@dataclass(frozen=True)
class Replacement:
    token_id: int
    keys: torch.Tensor  # [L, H, 1, D] at position p
    values: torch.Tensor  # [L, H, 1, D]
    forwards: int  # forward passes it cost


# -- lm (the worker's, unchanged) ---------------------------------------------------------
def repair_lm(
    repairer: LMRepairer, cache: BatchCache, b: int, p: int, candidates: int
) -> Replacement | None:
    rows = cache.rows(b)
    ranked = repairer.candidates(rows, p, candidates)
    if not ranked:
        return None
    kv = compute_kv(cache.lm, rows, [(p, ranked[0].token_id)])[0]
    forwards = 2 if p + 2 < rows.count else 1
    return Replacement(ranked[0].token_id, kv.keys, kv.values, forwards + 1)


# -- kv merge -----------------------------------------------------------------------------
def pair_weights(cache: BatchCache, b: int, step: StepResult, p: int, how: str) -> torch.Tensor:
    """Weights of rows p and p + 1: [2] or, for `attention_lh`, [2, L, H]."""
    if how == "attention":
        w = step.attention[p : p + 2].double()
    elif how == "attention_lh":
        w = step.per_head[:, :, p : p + 2].permute(2, 0, 1).double()  # [2, L, H]
    elif how == "accumulated":
        w = cache.accumulated[b, p : p + 2].double()
    elif how == "count":
        w = cache.count[b, p : p + 2].double()
    elif how == "equal":
        w = torch.ones(2, dtype=torch.float64)
    else:
        raise ValueError(f"unknown weights {how!r}; choose from {', '.join(WEIGHTS)}")
    total = w.sum(dim=0, keepdim=True)
    return torch.where(total > 0, w / total.clamp(min=1e-300), torch.full_like(w, 0.5))


def repair_kv(
    cache: BatchCache, b: int, step: StepResult, p: int, weights: str, key: str
) -> Replacement:
    rows = cache.rows(b)
    w = pair_weights(cache, b, step, p, weights)  # [2] or [2, L, H]
    if w.dim() == 1:
        w = w[:, None, None].expand(2, rows.keys.shape[0], rows.keys.shape[1])
    w = w.to(torch.float32)[..., None, None]  # [2, L, H, 1, 1]
    rope = cache.lm.geometry.rope
    k_a = rows.keys[:, :, p : p + 1].float()  # at p already
    k_b = rotate_keys(rows.keys[:, :, p + 1 : p + 2], torch.tensor([-1]), rope).float()
    v_a, v_b = rows.values[:, :, p : p + 1].float(), rows.values[:, :, p + 1 : p + 2].float()
    values = w[0] * v_a + w[1] * v_b
    if key == "mean":
        keys = w[0] * k_a + w[1] * k_b
    elif key == "heavier":
        keys = torch.where(w[0] >= w[1], k_a, k_b)
    else:
        raise ValueError(f"unknown key {key!r}; choose from {', '.join(KEYS)}")
    heavier = p if float(w[0].sum()) >= float(w[1].sum()) else p + 1
    dtype = rows.keys.dtype
    return Replacement(rows.token_ids[heavier], keys.to(dtype), values.to(dtype), 0)


# -- pair-aware lm ------------------------------------------------------------------------
def batched_pair_forward(lm: LoadedModel, rows: Rows, p: int, candidates: list[int]):
    """One forward over rows < p of [a, b, x_1..x_k]: a at p, b at p + 1 after a, each x_i
    alone at p. Returns (logits [2 + k, V], keys and values [L, H, 2 + k, D] of those tokens)."""
    k = len(candidates)
    a, b = rows.token_ids[p], rows.token_ids[p + 1]
    ids = torch.tensor([[a, b, *candidates]], dtype=torch.long)
    pos = torch.tensor([[p, p + 1] + [p] * k], dtype=torch.long)
    n = 2 + k
    mask = torch.zeros(1, 1, n, p + n, dtype=torch.bool)  # True attends
    mask[..., :p] = True
    idx = torch.arange(n)
    mask[0, 0, idx, p + idx] = True
    mask[0, 0, 1, p] = True  # b sees a
    with torch.inference_mode():
        out = lm.model(
            input_ids=ids,
            cache=fresh_cache(lm, rows.prefix(p)),
            position_ids=pos,
            attention_mask=mask,
            use_cache=True,
        )
    keys = torch.stack([layer.keys[0, :, -n:] for layer in out.cache.layers])
    values = torch.stack([layer.values[0, :, -n:] for layer in out.cache.layers])
    return out.logits[0].float(), keys, values


@dataclass(frozen=True)
class PairLM:
    pool: int = 0  # extra candidates from p(x | left); > 0 costs one more forward
    continuation: str = "kl"  # "kl" or "next"
    kv_weight: float = 1.0  # weight of the K/V distance in the score
    prior: bool = False  # add log p(x | left) (needs pool > 0's forward)

    def __post_init__(self) -> None:
        if self.continuation not in CONTINUATIONS:
            raise ValueError(f"continuation must be one of {', '.join(CONTINUATIONS)}")

    def repair(self, cache: BatchCache, b: int, p: int, banned: torch.Tensor) -> Replacement:
        lm, rows = cache.lm, cache.rows(b)
        if self.pool == 0 and not self.prior:  # the worker's own repairer (REPAIRER_PAIR_LM)
            worker = PairLMRepairer(lm, self.continuation, self.kv_weight)
            pair_ref = PairRef(p, (rows.token_ids[p], rows.token_ids[p + 1]))
            (r,), forwards, _ = worker.replace(rows, [pair_ref])
            assert r is not None
            return Replacement(r.token_id, r.keys, r.values, forwards)
        pair = [rows.token_ids[p], rows.token_ids[p + 1]]
        candidates = list(dict.fromkeys(pair))
        forwards = 1
        left = None
        if self.pool > 0 or self.prior:
            left = next_token_logits(lm, rows, rows.token_ids[p - 1], p - 1).log_softmax(-1)
            forwards += 1
            ranked = left.clone()
            ranked[banned] = float("-inf")
            for t in torch.topk(ranked, self.pool).indices.tolist():
                if t not in candidates:
                    candidates.append(t)
        logits, keys, values = batched_pair_forward(lm, rows, p, candidates)
        logp = logits.log_softmax(dim=-1)  # [2 + k, V]
        cand = logp[2:]
        if self.continuation == "kl" or p + 2 >= rows.count:
            target = logp[1]  # after the pair: what the model expected at p + 2
            score = -(target.exp() * (target - cand)).sum(dim=-1)
        else:
            score = cand[:, rows.token_ids[p + 2]].clone()
        if self.kv_weight:
            rope = lm.geometry.rope
            k_b = rotate_keys(rows.keys[:, :, p + 1 : p + 2], torch.tensor([-1]), rope)
            k_mean = (rows.keys[:, :, p : p + 1] + k_b).float() / 2  # [L, H, 1, D]
            v_mean = (rows.values[:, :, p : p + 1] + rows.values[:, :, p + 1 : p + 2]) / 2
            ref = torch.cat([k_mean, v_mean.float()], dim=-1)  # [L, H, 1, 2D]
            mine = torch.cat([keys[:, :, 2:], values[:, :, 2:]], dim=-1).float()  # [L, H, k, 2D]
            dist = ((mine - ref) ** 2).sum(dim=(0, 1, 3)) / (ref**2).sum().clamp(min=1e-12)
            score = score - self.kv_weight * dist
        if self.prior and left is not None:
            score = score + left[torch.tensor(candidates)]
        best = int(torch.argmax(score))
        return Replacement(
            candidates[best],
            keys[:, :, 2 + best : 3 + best].clone(),
            values[:, :, 2 + best : 3 + best].clone(),
            forwards,
        )
