"""Halo Weave (the user's design): brightness decays each tick and grows with the attention the
newest token pays a row; the adjacent pair with the lowest max-brightness is merged into one
token chosen by a repairer. Eviction of the dimmest row is the fallback when no pair can merge.

Two presets (measured in docs/benchmarks.md): `halo`, tuned — brightness is age alone (gain 0)
and the first 4 rows are protected like StreamingLLM's sinks; `halo-user`, the user's formula
exactly (seed 255, decay 2, gain 10, no sinks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from positronic.brightness import AGE_ONLY, USER_DEFAULTS, BrightnessParams, update_brightness
from positronic.policies.base import Plan, Policy
from positronic.selection import select_evictions, select_pairs


@dataclass
class HaloPolicy(Policy):
    name: str = "halo"
    params: BrightnessParams = field(default_factory=lambda: AGE_ONLY)
    recent_window: int = 8
    sinks: int = 4  # oldest rows never compacted besides structural ones (StreamingLLM's sinks)
    merges: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise ValueError("sinks must not be negative")

    def initial_score(self) -> float:
        return self.params.seed

    def update(self, scores: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, float]:
        return update_brightness(scores, attention[:-1], self.params), self.params.seed

    def plan(self, scores: torch.Tensor, structural: torch.Tensor, excess: int) -> Plan:
        if excess <= 0:
            return Plan()
        protected = self.protected(structural)
        protected[: self.sinks] = True
        pairs = select_pairs(scores, protected, excess)
        evictions: list[int] = []
        if len(pairs) < excess:  # not enough mergeable pairs: evict the dimmest rest
            taken = protected.clone()
            for p in pairs:
                taken[p] = taken[p + 1] = True
            evictions = select_evictions(scores, taken, excess - len(pairs))
        return Plan(merges=pairs, evictions=evictions)


@dataclass
class HaloUserPolicy(HaloPolicy):
    """The user's formula and selection exactly as designed: seed 255, decay 2, gain 10, only
    structural rows and the recent window protected."""

    name: str = "halo-user"
    params: BrightnessParams = field(default_factory=lambda: USER_DEFAULTS)
    sinks: int = 0
