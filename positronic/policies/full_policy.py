"""No compaction: the cache grows by one row per token until the model's positions (or the
session's hard maximum) run out, where the loop stops with an error instead of going past them."""

from __future__ import annotations

from dataclasses import dataclass

from positronic.policies.base import Policy


@dataclass
class FullPolicy(Policy):
    name: str = "full"
    description: str = "no compaction: stops at the model's positions or the hard maximum"
    keeps_scores: bool = False
