"""The `lm` repairer: the causal model proposes and judges the replacement itself.

For the pair (a, b) at rows (p, p + 1) followed by c (the row at p + 2, or the input token of the
Tick when the pair ends the rows): the candidates x are the pair's own tokens a and b plus the
`pool` (32) most likely tokens under p(x | rows < p) — the Tick and the Repair RPC draw the same
pool, whatever number of candidates is asked for — and each is scored by the log-probability of the
two-token continuation log p(x | rows < p) + log p(c | rows < p, x) — x placed at p, c read at
p + 1, where it will sit after the merge. Ranking by the second term alone would favour rare
tokens that happen to predict c; the sum is the likelihood of the merged text. A pair at row 0
has no left context and gets no candidates (the loop evicts a row of it instead).

Two batched forwards per Tick, whatever the number of pairs (tick.py):
1. the Tick's step pass also holds, for each pair, the row before it re-fed at its own position
   over the rows before it: its logits are p(x | rows < p) (`left_queries`);
2. one pass scores every candidate of every pair, each alone at its pair's position over the
   rows before it, and the winner's K/V are taken from that pass (`replace`), never recomputed.
The Repair RPC ranks the same candidates for one pair (`candidates`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model_worker.forward import Rows, alone_mask, alternatives_logits, next_token_logits, run
from model_worker.limits import REPAIR_POOL
from model_worker.model import LoadedModel
from model_worker.repair import Candidate, PairRef, Replacement, banned_ids, candidate


@dataclass
class LMRepairer:
    lm: LoadedModel
    pool: int = REPAIR_POOL  # candidates drawn from p(x | left) before rescoring (Tick and Repair)
    name: str = "lm"
    _banned: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self._banned = torch.tensor(sorted(banned_ids(self.lm)), dtype=torch.long)

    # -- the Repair RPC ---------------------------------------------------------------------
    def candidates(self, rows: Rows, position: int, max_candidates: int) -> list[Candidate]:
        p = position
        if p == 0:
            return []
        left = next_token_logits(self.lm, rows, rows.token_ids[p - 1], p - 1).cpu()
        ids = self._proposals(rows, p, left, max(self.pool, max_candidates))
        if not ids:
            return []
        scores = self._prior(left)[ids]
        follower = rows.token_ids[p + 2] if p + 2 < rows.count else None
        if follower is not None:
            logits = alternatives_logits(self.lm, rows, p, ids).cpu()
            scores = scores + logits.log_softmax(dim=-1)[:, follower]
        order = torch.argsort(scores, descending=True, stable=True)[:max_candidates]
        return [candidate(self.lm, ids[i], float(scores[i])) for i in order.tolist()]

    # -- the Tick ---------------------------------------------------------------------------
    def left_queries(self, rows: Rows, pairs: Sequence[PairRef]) -> list[tuple[int, int]]:
        """(token, row index) to add to the step's pass: the row before each pair (p > 0)."""
        return [(rows.token_ids[p.position - 1], p.position - 1) for p in pairs if p.position]

    def replace(
        self,
        rows: Rows,
        pairs: Sequence[PairRef],
        left_logits: torch.Tensor,
        follower_of_last: int,
        max_candidates: int,
    ) -> tuple[list[Replacement | None], int, int]:
        """The best replacement of each pair (None: no candidate), the forwards it ran and
        their time (ns).

        left_logits: [m, V], the logits of `left_queries` in order (pairs at row 0 have none);
        follower_of_last: the token that will follow a pair ending at the last row (the Tick's
        input token)."""
        plans: list[tuple[int, list[int], torch.Tensor]] = []  # (pair index, ids, priors)
        j = 0
        for i, pair in enumerate(pairs):
            if pair.position == 0:
                continue
            left = left_logits[j].cpu()
            j += 1
            # The same pool as the Repair RPC: the winner is often outside the top
            # max_candidates of the prior (the follower term reorders them).
            ids = self._proposals(rows, pair.position, left, max(self.pool, max_candidates))
            if ids:
                plans.append((i, ids, self._prior(left)[ids]))
        out: list[Replacement | None] = [None] * len(pairs)
        if not plans:
            return out, 0, 0
        tokens = [t for _, ids, _ in plans for t in ids]
        contexts = [pairs[i].position for i, ids, _ in plans for _ in ids]
        mask = alone_mask(rows.count, contexts, self.lm.device)
        positions = [rows.position(p) for p in contexts]
        scored = run(self.lm, rows, tokens, positions, mask, keep=range(len(tokens)))
        logp = scored.logits.cpu().log_softmax(dim=-1)  # [K, V]
        first = 0
        for i, ids, prior in plans:
            p = pairs[i].position
            follower = rows.token_ids[p + 2] if p + 2 < rows.count else follower_of_last
            scores = prior + logp[first : first + len(ids), follower]
            best = int(torch.argmax(scores))  # ties: the first, a pair's own token
            k = first + best
            out[i] = Replacement(
                token_id=ids[best],
                keys=scored.kv.keys[:, :, k : k + 1].clone(),
                values=scored.kv.values[:, :, k : k + 1].clone(),
                score=float(scores[best]),
            )
            first += len(ids)
        return out, 1, scored.forward_ns

    # -- shared -----------------------------------------------------------------------------
    def _prior(self, left: torch.Tensor) -> torch.Tensor:
        """log p(x | left) [V] with the ids no repairer proposes at -inf."""
        logp = left.float().log_softmax(dim=-1)
        logp[self._banned] = float("-inf")
        return logp

    def _proposals(self, rows: Rows, p: int, left: torch.Tensor, top: int) -> list[int]:
        """The pair's own tokens (when proposable), then the `top` most likely others."""
        prior = self._prior(left)
        own = [t for t in dict.fromkeys(rows.token_ids[p : p + 2]) if prior[t] > float("-inf")]
        n = min(top + len(own), int(torch.isfinite(prior).sum()))
        ranked = torch.topk(prior, n).indices.tolist() if n else []
        extra = [t for t in ranked if t not in own][:top]
        return [*own, *extra]
