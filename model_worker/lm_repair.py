"""The `lm` repairer: the causal model proposes and judges the replacement itself.

For the pair (a, b) at rows (p, p + 1) followed by c at p + 2: candidates x are the most likely
tokens under p(x | rows < p), and each is scored by the log-probability of the two-token
continuation log p(x | rows < p) + log p(c | rows < p, x) — x placed at p, c read at p + 1, where
it will sit after the merge. Ranking by the second term alone would favour rare tokens that
happen to predict c; the sum is the likelihood of the merged text. With no token after the pair
the score is log p(x | rows < p). A pair at row 0 has no left context and gets no candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model_worker.forward import Rows, alternatives_logits, next_token_logits
from model_worker.model import LoadedModel
from model_worker.repair import Candidate, banned_ids, candidate


@dataclass
class LMRepairer:
    lm: LoadedModel
    pool: int = 32  # candidates drawn from p(x | left) before rescoring
    name: str = "lm"
    _banned: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self._banned = torch.tensor(sorted(banned_ids(self.lm)), dtype=torch.long)

    def candidates(self, rows: Rows, position: int, max_candidates: int) -> list[Candidate]:
        p = position
        if p == 0:
            return []
        left = next_token_logits(self.lm, rows, rows.token_ids[p - 1], p - 1).cpu()
        left = left.log_softmax(dim=-1)
        left[self._banned] = float("-inf")
        n = min(max(self.pool, max_candidates), int(torch.isfinite(left).sum()))
        if n == 0:
            return []
        prior, ids = torch.topk(left, n)
        scores = prior.clone()
        if p + 2 < rows.count:
            follower = rows.token_ids[p + 2]
            logits = alternatives_logits(self.lm, rows, p, ids.tolist()).cpu()
            scores += logits.log_softmax(dim=-1)[:, follower]
        order = torch.argsort(scores, descending=True, stable=True)[:max_candidates]
        return [candidate(self.lm, int(ids[i]), float(scores[i])) for i in order.tolist()]
