"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference"):
score each row by the attention it has accumulated; keep the heavy hitters and a recent window,
evict the row with the lowest accumulated score.

The paper splits the cache budget evenly between heavy hitters and recent tokens (its default:
"heavy ratio" = "recent ratio"), so the recent window follows the budget: `recent_fraction` of
the target rows (recovered in `plan` as rows - excess), never fewer than `recent_window`.

This is the layer-reduced, single-row variant: the paper (and TOVA) evict per layer and per head,
each keeping its own tokens; here a row holds one token in every layer (the mirror's invariant),
so the score is the newest token's attention row reduced over heads and layers (the loop's
`attention_reduction`), and an evicted row leaves every layer at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from positronic.policies.base import Plan, Policy
from positronic.selection import protected_mask, select_evictions


@dataclass
class H2OPolicy(Policy):
    name: str = "h2o"
    description: str = (
        "H2O (Zhang et al., 2023), layer-reduced: heavy hitters by accumulated attention + a "
        "recent window, half the budget each"
    )
    recent_fraction: float = 0.5  # share of the budget kept as the recent window (paper: half)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent_fraction < 1.0:
            raise ValueError("recent_fraction must be in [0, 1)")

    def update(
        self, scores: torch.Tensor, attention: torch.Tensor, similarity: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float]:
        return scores.float() + attention[:-1].float(), float(attention[-1])

    def window(self, target_rows: int) -> int:
        """Rows of the recent window when the cache holds `target_rows` after the tick."""
        return max(self.recent_window, round(self.recent_fraction * target_rows))

    def plan(self, scores: torch.Tensor, structural: torch.Tensor, excess: int) -> Plan:
        if excess <= 0:
            return Plan()
        protected = protected_mask(structural, self.window(scores.numel() - excess))
        return Plan(evictions=select_evictions(scores, protected, excess))
