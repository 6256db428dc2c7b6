"""Which rows to compact: pure functions over brightness (or any score) and row flags."""

from __future__ import annotations

import torch


def protected_mask(structural: torch.Tensor, recent_window: int) -> torch.Tensor:
    """Rows no policy may touch: structural tokens (BOS...) and the newest `recent_window` rows.

    structural: [S] bool. Returns [S] bool.
    """
    mask = structural.clone().bool()
    if recent_window > 0:
        mask[-recent_window:] = True
    return mask


def select_pairs(scores: torch.Tensor, protected: torch.Tensor, count: int = 1) -> list[int]:
    """Up to `count` non-overlapping adjacent pairs (i, i + 1) with the lowest max(score).

    Neither row of a pair may be protected. Ties go to the lower position (deterministic).
    Returns the pairs' first positions in ascending order.
    scores: [S] float; protected: [S] bool.
    """
    n = scores.numel()
    if n < 2 or count <= 0:
        return []
    pair_score = torch.maximum(scores[:-1], scores[1:]).double()  # [S-1]
    pair_score[protected[:-1] | protected[1:]] = float("inf")
    order = torch.sort(pair_score, stable=True).indices  # ties: lower position first
    chosen: list[int] = []
    taken: set[int] = set()
    for i in order.tolist():
        if len(chosen) == count or pair_score[i] == float("inf"):
            break
        if i in taken or i + 1 in taken:
            continue
        taken.update((i, i + 1))
        chosen.append(i)
    return sorted(chosen)


def select_evictions(scores: torch.Tensor, protected: torch.Tensor, count: int = 1) -> list[int]:
    """The `count` unprotected rows with the lowest score (ties: lower position), ascending."""
    if count <= 0:
        return []
    masked = scores.double().masked_fill(protected.bool(), float("inf"))
    order = torch.sort(masked, stable=True).indices[:count]  # ties: lower position first
    return sorted(i for i in order.tolist() if masked[i] != float("inf"))
