"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks"):
keep the first few tokens (attention sinks) and a window of the most recent ones; evict the
oldest tokens in between."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from positronic.policies.base import Plan, Policy
from positronic.selection import select_evictions


@dataclass
class StreamingPolicy(Policy):
    name: str = "streaming"
    description: str = "StreamingLLM (Xiao et al., 2023): attention sinks + a recent window"
    sinks: int = 4
    keeps_scores: bool = False  # age is the row index: no scores to keep

    def plan(self, scores: torch.Tensor, structural: torch.Tensor, excess: int) -> Plan:
        if excess <= 0:
            return Plan()
        protected = self.protected(structural)
        protected[: self.sinks] = True
        age_order = torch.arange(scores.numel(), dtype=torch.float32)  # oldest first
        return Plan(evictions=select_evictions(age_order, protected, excess))
