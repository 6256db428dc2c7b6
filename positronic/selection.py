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
    return _greedy_pairs(pair_score, count)


def select_evictions(scores: torch.Tensor, protected: torch.Tensor, count: int = 1) -> list[int]:
    """The `count` unprotected rows with the lowest score (ties: lower position), ascending."""
    if count <= 0:
        return []
    masked = scores.double().masked_fill(protected.bool(), float("inf"))
    order = torch.sort(masked, stable=True).indices[:count]  # ties: lower position first
    return sorted(i for i in order.tolist() if masked[i] != float("inf"))


def _greedy_pairs(pair_score: torch.Tensor, count: int) -> list[int]:
    """Up to `count` non-overlapping pairs, lowest score first (ties: lower position)."""
    order = torch.sort(pair_score, stable=True).indices
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


def select_balanced_pairs(
    counts: torch.Tensor, protected: torch.Tensor, count: int = 1, cap: float = float("inf")
) -> list[int]:
    """Pairs whose rows together represent the fewest tokens (ties: the oldest), never more
    than `cap`: merging them keeps a multi-resolution memory — recent rows one token each, older
    rows coarser (the Compressive Transformer's idea, Rae et al., 2020, with pairwise merges).

    counts: [S] tokens each row stands for; protected: [S] bool.
    """
    if counts.numel() < 2 or count <= 0:
        return []
    pair_score = (counts[:-1] + counts[1:]).double()
    pair_score[protected[:-1] | protected[1:] | (pair_score > cap)] = float("inf")
    return _greedy_pairs(pair_score, count)


def select_redundant_pairs(
    keys: torch.Tensor, values: torch.Tensor, protected: torch.Tensor, count: int, rope
) -> list[int]:
    """Adjacent pairs most alike (KVMerger's criterion, Wang et al., 2024): cosine similarity of
    the keys, the later one rotated back one position so both sit at the same one (RoPE makes
    keys at different positions incomparable), and of the values, averaged over layers and
    heads; the most similar unprotected pairs first.

    keys, values: [L, H, S, D], keys rotated to each row's index; protected: [S] bool.
    """
    from positronic.rope import rotate_keys

    s = keys.shape[2]
    if s < 2 or count <= 0:
        return []
    later = rotate_keys(keys[:, :, 1:], torch.full((s - 1,), -1), rope).float()
    sim_k = torch.nn.functional.cosine_similarity(keys[:, :, :-1].float(), later, dim=-1)
    sim_v = torch.nn.functional.cosine_similarity(
        values[:, :, :-1].float(), values[:, :, 1:].float(), dim=-1
    )
    similarity = ((sim_k + sim_v) / 2).mean(dim=(0, 1))  # [S - 1]
    pair_score = -similarity.double()
    pair_score[protected[:-1] | protected[1:]] = float("inf")
    return _greedy_pairs(pair_score, count)
