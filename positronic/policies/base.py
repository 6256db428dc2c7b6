"""What every compaction policy provides: a score update and a compaction plan, both pure.

One machinery, many policies: the loop feeds each policy the newest token's attention row, keeps
its per-row scores in the mirror's brightness field (one SetBrightness op per tick), and turns the
plan into ReplacePair / Evict ops of the tick's single Patch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from positronic.selection import protected_mask

REPAIRERS = ("default", "lm", "mlm", "kv_merge", "pair_lm")  # default: the worker's --repair
KV_WEIGHTS = ("attention", "equal")
KV_KEYS = ("mean", "heavier")


@dataclass(frozen=True)
class RepairSpec:
    """How a merging policy's pairs are replaced: what the loop asks the worker's Tick for
    (TickRequest.repair / model_worker.proto RepairParams), and what ListPolicies reports.

    `default` is the worker's configured repairer (its --repair: `lm` or `mlm`). `lm` and `mlm`
    put one token in the pair's place and compute its K/V at the pair's first
    row; `kv_merge` combines the pair's own K/V into one row with no forward pass: value = the
    weighted mean of the two values, key = the weighted mean of both keys rotated to the merged
    row's position (`mean`) or the heavier row's key (`heavier`); weights = the attention the
    Tick's input token pays each row (`attention`) or `equal`. The mirror keeps the heavier
    row's token and the pair's text. `pair_lm` (model_worker/pair_repair.py) keeps one of the
    pair's own tokens, the one that best lets the model continue as the pair did with K/V
    nearest the pair's (one forward).
    """

    repairer: str = "default"
    candidates: int = 5  # lm / mlm: replacements ranked per pair (the loop takes the best)
    kv_weights: str = "attention"
    kv_key: str = "mean"

    def __post_init__(self) -> None:
        if self.repairer not in REPAIRERS:
            raise ValueError(f"repairer must be one of {', '.join(REPAIRERS)}")
        if self.kv_weights not in KV_WEIGHTS or self.kv_key not in KV_KEYS:
            raise ValueError(f"kv_weights in {KV_WEIGHTS}, kv_key in {KV_KEYS}")
        if self.candidates < 1:
            raise ValueError("candidates must be at least 1")


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
    repair: RepairSpec | None = None  # how merges are repaired (merging policies only)
    # Whether update() needs `similarity` (TickResponse.adjacent_similarity): the loop asks the
    # Tick for it only then, so no other policy pays for it.
    reads_similarity: bool = False
    description: str = "no compaction"

    def __post_init__(self) -> None:
        if self.recent_window < 1:
            raise ValueError("recent_window must be at least 1 (the newest token is not cached)")

    def initial_score(self) -> float:
        """Score of a row primed from the prompt."""
        return 0.0

    def update(
        self, scores: torch.Tensor, attention: torch.Tensor, similarity: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float]:
        """New scores of the S cached rows and the score of the new token.

        scores: [S]; attention: [S + 1], the new token's attention over the rows and itself;
        similarity: [S], row i's similarity to row i + 1 (row S the new token), given to a
        policy that `reads_similarity`, else None.
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

    def parameters(self) -> dict[str, float]:
        """Every numeric parameter, flattened (brightness params as `brightness.seed`...): what
        ListPolicies reports so that a client can reproduce the preset."""
        out: dict[str, float] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or f.name in ("repair",):
                continue
            if isinstance(value, int | float):
                out[f.name] = float(value)
            elif hasattr(value, "__dataclass_fields__"):
                for g in fields(value):
                    v = getattr(value, g.name)
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        out[f"{f.name}.{g.name}"] = float(v)
        return out
