"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): evict the row to which the
newest token pays the least attention (mean over heads); no accumulation, no recent window
beyond the token being appended.

This is the layer-reduced, single-row variant: the paper decides per layer (each layer keeps its
own tokens); here a row holds one token in every layer (the mirror's invariant), so the score is
the newest token's attention row reduced over layers (the loop's `attention_reduction`: the last
layer by default) and an evicted row leaves every layer at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from positronic.policies.base import Plan, Policy
from positronic.selection import select_evictions


@dataclass
class TovaPolicy(Policy):
    name: str = "tova"
    description: str = (
        "TOVA (Oren et al., 2024), layer-reduced: evict the row the newest token attends least"
    )
    recent_window: int = 1

    def update(
        self, scores: torch.Tensor, attention: torch.Tensor, similarity: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float]:
        return attention[:-1].float().clone(), float(attention[-1])

    def plan(self, scores: torch.Tensor, structural: torch.Tensor, excess: int) -> Plan:
        if excess <= 0:
            return Plan()
        return Plan(evictions=select_evictions(scores, self.protected(structural), excess))
