"""Compaction policies, one per file, all driven by the same loop."""

from __future__ import annotations

from positronic.policies.balanced_policy import BalancedPolicy
from positronic.policies.base import Plan, Policy, RepairSpec
from positronic.policies.full_policy import FullPolicy
from positronic.policies.h2o_policy import H2OPolicy
from positronic.policies.halo_policy import (
    HaloEvictPolicy,
    HaloKVAgePolicy,
    HaloKVPolicy,
    HaloLMPolicy,
    HaloPairPolicy,
    HaloPolicy,
    HaloUserPolicy,
)
from positronic.policies.redundant_policy import RedundantPolicy
from positronic.policies.streaming_policy import StreamingPolicy
from positronic.policies.tova_policy import TovaPolicy

POLICIES: dict[str, type[Policy]] = {
    "halo": HaloPolicy,
    "halo-user": HaloUserPolicy,
    "halo-lm": HaloLMPolicy,
    "halo-kv": HaloKVPolicy,
    "halo-kv-age": HaloKVAgePolicy,
    "halo-evict": HaloEvictPolicy,
    "halo-pair": HaloPairPolicy,
    "halo-redundant": RedundantPolicy,
    "halo-balanced": BalancedPolicy,
    "streaming": StreamingPolicy,
    "h2o": H2OPolicy,
    "tova": TovaPolicy,
    "full": FullPolicy,
}


def make_policy(name: str, **overrides) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}") from None
    return cls(**overrides)


__all__ = ["POLICIES", "Plan", "Policy", "RepairSpec", "make_policy"]
