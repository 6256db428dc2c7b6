"""`halo-redundant`: merge the adjacent pair whose rows are most alike (KVMerger's criterion,
Wang et al., 2024, "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on
Long-Context Tasks"), in K/V space.

A row's score is 1 + its similarity to the next row (model_worker/similarity.py: the cosine of the
keys at one position and of the values, mean over layers and heads; shifted into [0, 2] because
brightness is never negative), which only the worker can compute: the loop asks each Tick for it
(TickRequest.adjacent_similarity) and keeps it in the mirror's brightness field. Like every merging
policy it plans one tick behind, from the committed scores: a pair's similarity depends only on its
own two rows, so it is stale only next to last tick's edits — a merged row has no score until the
next Tick (NO_SUCCESSOR), and the row before it keeps its similarity to the row that was merged
away for that one tick.

Settings: the search's best redundancy configuration (docs/quality-search.md, tune streams):
StreamingLLM's 4 sinks, a recent window of 32 (with 8 the most alike pairs are the recent rows
the model lives on: 21% worse), values and keys averaged with equal weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from positronic.policies.base import Plan, Policy, RepairSpec
from positronic.selection import select_similar_pairs

NO_SUCCESSOR = 0.0  # 1 + the least similarity (-1): a row whose next row is not known yet


def equal_mean_merge() -> RepairSpec:
    """The K/V merge with equal weights and the mean of both keys (rotated to the row)."""
    return RepairSpec("kv_merge", kv_weights="equal", kv_key="mean")


@dataclass
class RedundantPolicy(Policy):
    name: str = "halo-redundant"
    description: str = (
        "merge the most alike adjacent pair (KVMerger's K/V cosine similarity, from the Tick) in "
        "K/V space, equal weights; 4 sinks, recent window 32"
    )
    recent_window: int = 32
    sinks: int = 4
    merges: bool = True
    reads_similarity: bool = True
    repair: RepairSpec | None = field(default_factory=equal_mean_merge)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise ValueError("sinks must not be negative")

    def initial_score(self) -> float:
        return NO_SUCCESSOR

    def update(
        self, scores: torch.Tensor, attention: torch.Tensor, similarity: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float]:
        if similarity is None or similarity.numel() != scores.numel():
            got = "none" if similarity is None else similarity.numel()
            raise ValueError(f"{self.name} needs one similarity per row ({scores.numel()}), {got}")
        return 1.0 + similarity.to(torch.float32), NO_SUCCESSOR

    def plan(self, scores: torch.Tensor, structural: torch.Tensor, excess: int) -> Plan:
        if excess <= 0:
            return Plan()
        protected = self.protected(structural)
        protected[: self.sinks] = True
        pairs = select_similar_pairs(scores[:-1], protected, excess)
        return Plan(merges=pairs, evictions=oldest_free(protected, pairs, excess - len(pairs)))

    def merged_score(self, scores: torch.Tensor, position: int) -> float:
        return NO_SUCCESSOR


def oldest_free(protected: torch.Tensor, pairs: list[int], count: int) -> list[int]:
    """The `count` oldest rows neither protected nor in a chosen pair (when too few pairs can
    merge), ascending."""
    if count <= 0:
        return []
    taken = protected.clone()
    for p in pairs:
        taken[p] = taken[p + 1] = True
    return (~taken).nonzero().flatten().tolist()[:count]
