"""The `pair_lm` repairer: a pair-aware causal-model repair (issue 10), the search's best setting.

The shipped `lm` repairer (lm_repair.py) ranks tokens by how likely they are after the left
context, so what replaces "big dog" is often a story opening. This one asks what the merged row
must preserve instead. For the pair (a, b) at rows (p, p + 1), followed by c (the row at p + 2):

- the candidates are the pair's own tokens only, {a, b} (docs/quality-search.md: adding the
  likeliest tokens after the left context made it worse);
- each candidate x is placed alone at p over the rows before p, and scored by how well the model
  continues as the pair did, log p(c | rows < p, x) (`next`; or −KL(p(· | rows < p, a, b) ‖
  p(· | rows < p, x)), `kl`, which is also what a pair with no row after it uses), minus
  `kv_weight` × the relative squared distance of x's K/V at p from the pair's mean K/V at p
  (both keys rotated to p: RoPE makes keys at different positions incomparable);
- the winner's K/V are taken from that same pass, never recomputed.

One batched forward per Tick, whatever the number of pairs: every candidate of every pair (and,
for a `kl` pair, a at p and b after it) as its own query over the rows before its pair.
The simulator (positronic/bench/explore_repair.py) calls this same code for its `pair`
repairer without a pool, so the search's numbers and the services' agree per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model_worker.forward import Rows, alone_mask, run
from model_worker.model import LoadedModel
from model_worker.repair import PairRef, Replacement
from positronic.rope import Rope, rotate_keys

CONTINUATIONS = ("next", "kl")


@dataclass(frozen=True)
class _Plan:
    """One pair's queries in the batched pass: candidates x at p; for `kl`, a and b first."""

    index: int  # the pair's index in the request
    position: int
    candidates: list[int]
    kl: bool  # scored by −KL to the pair's continuation (needs the a, b queries)
    first: int  # index of its first query in the pass


@dataclass
class PairLMRepairer:
    lm: LoadedModel
    continuation: str = "next"  # the search's best (docs/quality-search.md)
    kv_weight: float = 1.0
    name: str = "pair_lm"

    def __post_init__(self) -> None:
        if self.continuation not in CONTINUATIONS:
            raise ValueError(f"continuation must be one of {', '.join(CONTINUATIONS)}")

    def replace(
        self, rows: Rows, pairs: Sequence[PairRef]
    ) -> tuple[list[Replacement | None], int, int]:
        """The best replacement of each pair, the forwards it ran (0 or 1) and their time (ns)."""
        if not pairs:
            return [], 0, 0
        plans: list[_Plan] = []
        tokens: list[int] = []
        contexts: list[int] = []  # each query sees rows [0, context) and itself (and a, for b)
        positions: list[int] = []
        for i, pair in enumerate(pairs):
            p = pair.position
            a, b = rows.token_ids[p], rows.token_ids[p + 1]
            candidates = list(dict.fromkeys((a, b)))
            kl = self.continuation == "kl" or p + 2 >= rows.count
            plans.append(_Plan(i, p, candidates, kl, len(tokens)))
            queries = ([a, b] if kl else []) + candidates
            tokens += queries
            contexts += [p] * len(queries)
            positions += ([rows.position(p), rows.position(p + 1)] if kl else []) + [
                rows.position(p)
            ] * len(candidates)
        mask = alone_mask(rows.count, contexts, self.lm.device)
        for plan in plans:
            if plan.kl:  # b, at p + 1, also sees a
                mask[plan.first + 1, rows.count + plan.first] = True
        scored = run(self.lm, rows, tokens, positions, mask, keep=range(len(tokens)))
        logp = scored.logits.float().log_softmax(dim=-1).cpu()  # [Q, V]
        keys, values = scored.kv.keys, scored.kv.values  # [L, H, Q, D]
        out: list[Replacement | None] = [None] * len(pairs)
        for plan in plans:
            out[plan.index] = self._best(rows, plan, logp, keys, values)
        return out, 1, scored.forward_ns

    def _best(self, rows: Rows, plan: _Plan, logp, keys, values) -> Replacement:
        p, k = plan.position, len(plan.candidates)
        start = plan.first + (2 if plan.kl else 0)
        cand = logp[start : start + k]  # [k, V]
        if plan.kl:
            target = logp[plan.first + 1]  # after a, b: what the model expected at p + 2
            score = -(target.exp() * (target - cand)).sum(dim=-1)
        else:
            score = cand[:, rows.token_ids[p + 2]].clone()
        mine_k, mine_v = keys[:, :, start : start + k], values[:, :, start : start + k]
        if self.kv_weight:
            distance = kv_distance(rows, p, mine_k, mine_v, self.lm.geometry.rope).cpu()
            score = score - self.kv_weight * distance
        best = int(torch.argmax(score))  # ties: the first, the pair's first token
        return Replacement(
            token_id=plan.candidates[best],
            keys=mine_k[:, :, best : best + 1].clone(),
            values=mine_v[:, :, best : best + 1].clone(),
            score=float(score[best]),
        )


def kv_distance(
    rows: Rows, p: int, keys: torch.Tensor, values: torch.Tensor, rope: Rope
) -> torch.Tensor:
    """[k]: each candidate's ‖(k, v) − mean‖² / ‖mean‖² over every layer and head, where mean is
    the pair's mean key (both rotated to row p) and mean value. keys, values: [L, H, k, D] at p."""
    k_b = rotate_keys(rows.keys[:, :, p + 1 : p + 2], torch.tensor([-1]), rope)
    k_mean = (rows.keys[:, :, p : p + 1] + k_b).float() / 2  # [L, H, 1, D]
    v_mean = (rows.values[:, :, p : p + 1] + rows.values[:, :, p + 1 : p + 2]) / 2
    ref = torch.cat([k_mean, v_mean.float()], dim=-1)  # [L, H, 1, 2D]
    mine = torch.cat([keys, values], dim=-1).float()  # [L, H, k, 2D]
    return ((mine - ref) ** 2).sum(dim=(0, 1, 3)) / (ref**2).sum().clamp(min=1e-12)
