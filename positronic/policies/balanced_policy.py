"""`halo-balanced`: a multi-resolution memory — merge the adjacent pair that stands for the
fewest tokens, never more than `cap` in one row (the Compressive Transformer's idea, Rae et al.,
2020, "Compressive Transformers for Long-Range Sequence Modelling", with pairwise merges).

A row's score is the number of tokens it stands for (1 for a new row, the sum of the pair's for
a merged one), kept in the mirror's brightness field, so `inspect` shows it; attention is not
used. When no pair fits under the cap the oldest unprotected rows are evicted.

Settings: the search's best balanced configuration that the services run exactly
(docs/quality-search.md, tune streams: `select=balanced|cap=2|weights=count` with 4 sinks and a
recent window of 8): with a cap of 2 only single-token rows merge, so weighting by tokens
represented is the K/V merge's equal weights. (Uncapped with a window of 32 measured better,
1.068 against 1.095 × the best eviction, but its merges need per-pair weights from the driver,
PairRef.weights, which the loop does not send.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from positronic.policies.base import Plan, Policy, RepairSpec
from positronic.policies.redundant_policy import equal_mean_merge, oldest_free
from positronic.selection import select_balanced_pairs


@dataclass
class BalancedPolicy(Policy):
    name: str = "halo-balanced"
    description: str = (
        "multi-resolution memory: merge the pair standing for the fewest tokens (at most 2 per "
        "row) in K/V space, then evict the oldest; 4 sinks, recent window 8"
    )
    recent_window: int = 8
    sinks: int = 4
    cap: float = 2.0  # the most tokens one merged row may stand for
    merges: bool = True
    repair: RepairSpec | None = field(default_factory=equal_mean_merge)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0 or self.cap < 2:
            raise ValueError("sinks must not be negative, cap at least 2")

    def initial_score(self) -> float:
        return 1.0  # a new row stands for its own token

    def update(
        self, scores: torch.Tensor, attention: torch.Tensor, similarity: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float]:
        return scores.clone(), 1.0

    def plan(self, scores: torch.Tensor, structural: torch.Tensor, excess: int) -> Plan:
        if excess <= 0:
            return Plan()
        protected = self.protected(structural)
        protected[: self.sinks] = True
        pairs = select_balanced_pairs(scores, protected, excess, self.cap)
        return Plan(merges=pairs, evictions=oldest_free(protected, pairs, excess - len(pairs)))

    def merged_score(self, scores: torch.Tensor, position: int) -> float:
        return float(scores[position] + scores[position + 1])
