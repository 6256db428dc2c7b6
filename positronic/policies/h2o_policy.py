"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference"):
score each row by the attention it has accumulated; keep the heavy hitters and a recent window,
evict the row with the lowest accumulated score."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from positronic.policies.base import Plan, Policy
from positronic.selection import select_evictions


@dataclass
class H2OPolicy(Policy):
    name: str = "h2o"
    recent_window: int = 16

    def update(self, scores: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, float]:
        return scores.float() + attention[:-1].float(), float(attention[-1])

    def plan(self, scores: torch.Tensor, structural: torch.Tensor, excess: int) -> Plan:
        if excess <= 0:
            return Plan()
        return Plan(evictions=select_evictions(scores, self.protected(structural), excess))
