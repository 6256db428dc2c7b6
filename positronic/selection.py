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
    allowed = ~(protected[:-1] | protected[1:])
    candidates = [
        i for _, i in sorted((float(pair_score[i]), i) for i in range(n - 1) if bool(allowed[i]))
    ]
    taken: set[int] = set()
    chosen: list[int] = []
    for i in candidates:
        if len(chosen) == count:
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
    order = sorted((float(scores[i]), i) for i in range(scores.numel()) if not bool(protected[i]))
    return sorted(i for _, i in order[:count])
