"""Halo Weave (the user's design): brightness decays each tick and grows with the attention the
newest token pays a row; the adjacent pair with the lowest max-brightness is merged into one row
by a repairer. Eviction of the dimmest row is the fallback when no pair can merge.

Presets (measured in docs/quality-search.md and docs/benchmarks.md):
- `halo` (the default): the best merging configuration of the search that the services can run
  — the user's formula with a larger attention gain (30), no sinks, and K/V-space merges (no
  forward pass: values averaged by the attention the newest token pays the two rows, the
  more-attended row's key; CaM / D2O / KVMerger's family). Needs the worker's Tick (KV_MERGE).
- `halo-kv`: the same configuration under the name of its family (kept for clients that name it).
- `halo-lm`: the previous default — brightness is age alone (gain 0), the first 4 rows protected
  like StreamingLLM's sinks, the worker's repairer (lm): it merges the oldest pair after the
  sinks.
- `halo-user`: the user's formula exactly (seed 255, decay 2, gain 10, no sinks), the worker's
  repairer.
- `halo-kv-age`: the oldest pair after BOS merged in K/V space, so one row keeps a running
  summary of everything older than the cache (it did not pay: docs/quality-search.md).
- `halo-evict`: `halo`'s selection, evicting the pair's dimmer row instead of merging — the
  eviction twin that tells whether the merge itself adds anything.
- `halo-pair`: the oldest pair after BOS (age only, as `halo-lm` without its sinks) replaced by
  the pair-aware `pair_lm` repairer (model_worker/pair_repair.py): one of the pair's own tokens,
  the one that best predicts the token after the pair with K/V nearest the pair's; the search's
  best pair-aware setting (`cont=next`, K/V weight 1, no pool).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from positronic.brightness import AGE_ONLY, USER_DEFAULTS, BrightnessParams, update_brightness
from positronic.policies.base import Plan, Policy, RepairSpec
from positronic.selection import select_evictions, select_pairs

# The search's best merging configuration (docs/quality-search.md): the user's formula with an
# attention gain of 30 and no sinks, pairs merged in K/V space.
KV_PARAMS = BrightnessParams(gain=30.0)


def _kv_merge() -> RepairSpec:
    return RepairSpec("kv_merge", kv_weights="attention", kv_key="heavier")


@dataclass
class HaloPolicy(Policy):
    name: str = "halo"
    description: str = (
        "Halo Weave with K/V merges (the default): the user's formula at gain 30, no sinks; values "
        "averaged by this tick's attention, the more-attended row's key (no forward pass)"
    )
    params: BrightnessParams = field(default_factory=lambda: KV_PARAMS)
    recent_window: int = 8
    sinks: int = 0  # oldest rows never compacted besides structural ones (StreamingLLM's sinks)
    merges: bool = True  # False: the chosen pair's dimmer row is evicted instead (eviction twin)
    repair: RepairSpec | None = field(default_factory=_kv_merge)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise ValueError("sinks must not be negative")

    def initial_score(self) -> float:
        return self.params.seed

    def update(
        self, scores: torch.Tensor, attention: torch.Tensor, similarity: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float]:
        return update_brightness(scores, attention[:-1], self.params), self.params.seed

    def plan(self, scores: torch.Tensor, structural: torch.Tensor, excess: int) -> Plan:
        if excess <= 0:
            return Plan()
        protected = self.protected(structural)
        protected[: self.sinks] = True
        pairs = select_pairs(scores, protected, excess)
        if not self.merges:  # the eviction twin: each chosen pair loses its dimmer row
            dimmer = [p if scores[p] <= scores[p + 1] else p + 1 for p in pairs]
            return Plan(evictions=sorted(dimmer))
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
    description: str = "Halo Weave, the user's formula exactly, the worker's repairer"
    params: BrightnessParams = field(default_factory=lambda: USER_DEFAULTS)
    sinks: int = 0
    repair: RepairSpec | None = field(default_factory=RepairSpec)


@dataclass
class HaloLMPolicy(HaloPolicy):
    """The default before the search: brightness is age, 4 sinks, the worker's repairer."""

    name: str = "halo-lm"
    description: str = "Halo Weave, age only: the oldest pair after 4 sinks, the worker's repairer"
    params: BrightnessParams = field(default_factory=lambda: AGE_ONLY)
    sinks: int = 4
    repair: RepairSpec | None = field(default_factory=RepairSpec)


@dataclass
class HaloKVPolicy(HaloPolicy):
    """`halo` under its family's name."""

    name: str = "halo-kv"
    description: str = "the same as halo: Halo Weave with K/V merges (gain 30, no sinks)"


@dataclass
class HaloKVAgePolicy(HaloPolicy):
    name: str = "halo-kv-age"
    description: str = (
        "the oldest pair after BOS merged in K/V space (a running summary row); attention "
        "weights, mean key"
    )
    params: BrightnessParams = field(default_factory=lambda: AGE_ONLY)
    sinks: int = 0
    repair: RepairSpec | None = field(
        default_factory=lambda: RepairSpec("kv_merge", kv_weights="attention", kv_key="mean")
    )


@dataclass
class HaloEvictPolicy(HaloPolicy):
    name: str = "halo-evict"
    description: str = "halo's selection, evicting the pair's dimmer row instead of merging"
    merges: bool = False
    repair: RepairSpec | None = None


@dataclass
class HaloPairPolicy(HaloPolicy):
    name: str = "halo-pair"
    description: str = (
        "the oldest pair after BOS replaced by its own token that best predicts the next one, "
        "K/V nearest the pair's (the pair-aware lm repairer, one forward)"
    )
    params: BrightnessParams = field(default_factory=lambda: AGE_ONLY)
    sinks: int = 0
    repair: RepairSpec | None = field(default_factory=lambda: RepairSpec("pair_lm"))
