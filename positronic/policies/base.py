"""What every compaction policy provides: a score update and a compaction plan, both pure.

One machinery, many policies: the loop feeds each policy the newest token's attention row, keeps
its per-row scores in the mirror's brightness field (one SetBrightness op per tick), and turns the
plan into ReplacePair / Evict ops of the tick's single Patch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from positronic.selection import protected_mask


@dataclass(frozen=True)
class Plan:
    """Rows to compact this tick, positions in the rows *after* the new token is appended."""

    merges: list[int] = field(default_factory=list)  # first row of each adjacent pair
    evictions: list[int] = field(default_factory=list)


@dataclass
class Policy:
    """Base policy: scores never change, nothing is compacted (the `full` behaviour)."""

    name: str = "base"
    recent_window: int = 1  # newest rows no plan may touch (>= 1: the new token is not cached yet)
    keeps_scores: bool = True  # whether the loop sends SetBrightness each tick
    merges: bool = False  # whether plan() proposes merges (which need a repairer)

    def __post_init__(self) -> None:
        if self.recent_window < 1:
            raise ValueError("recent_window must be at least 1 (the newest token is not cached)")

    def initial_score(self) -> float:
        """Score of a row primed from the prompt."""
        return 0.0

    def update(self, scores: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, float]:
        """New scores of the S cached rows and the score of the new token.

        scores: [S]; attention: [S + 1], the new token's attention over the rows and itself.
        """
        return scores.clone(), self.initial_score()

    def plan(self, scores: torch.Tensor, structural: torch.Tensor, excess: int) -> Plan:
        """Compaction that removes `excess` rows. scores, structural: [S + 1] (new row last)."""
        return Plan()

    def merged_score(self, scores: torch.Tensor, position: int) -> float:
        """Score of the token replacing the pair (position, position + 1): the higher one."""
        return float(torch.maximum(scores[position], scores[position + 1]))

    def protected(self, structural: torch.Tensor) -> torch.Tensor:
        return protected_mask(structural, self.recent_window)
