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


def adjacent_similarity(keys: torch.Tensor, values: torch.Tensor, rope) -> torch.Tensor:
    """How alike each row is to the next (KVMerger's criterion, Wang et al., 2024, "Model Tells
    You Where to Merge"): the cosine similarity of the keys, the later one rotated back one
    position so both sit at the same one (RoPE makes keys at different positions incomparable),
    and of the values, averaged; then the mean over layers and heads. [S - 1], in [-1, 1].

    keys, values: [L, H, S, D], row i's key rotated to position (offset + i). Only the pair's
    own two rows enter a value, and a shared rotation leaves a cosine unchanged, so a pair's
    similarity does not depend on where the pair sits.
    """
    from positronic.rope import rotate_keys

    s = keys.shape[2]
    if s < 2:
        return torch.zeros(0)
    later = rotate_keys(keys[:, :, 1:], torch.full((s - 1,), -1), rope).float()
    sim_k = torch.nn.functional.cosine_similarity(keys[:, :, :-1].float(), later, dim=-1)
    sim_v = torch.nn.functional.cosine_similarity(
        values[:, :, :-1].float(), values[:, :, 1:].float(), dim=-1
    )
    return ((sim_k + sim_v) / 2).mean(dim=(0, 1))  # [S - 1]


def select_similar_pairs(
    similarity: torch.Tensor, protected: torch.Tensor, count: int = 1
) -> list[int]:
    """Up to `count` non-overlapping unprotected pairs (i, i + 1), the most alike first (ties:
    the lower position). similarity: [S - 1] (pair i = rows i, i + 1); protected: [S] bool."""
    if similarity.numel() < 1 or count <= 0:
        return []
    pair_score = -similarity.double()
    pair_score[protected[:-1] | protected[1:]] = float("inf")
    return _greedy_pairs(pair_score, count)


def select_redundant_pairs(
    keys: torch.Tensor, values: torch.Tensor, protected: torch.Tensor, count: int, rope
) -> list[int]:
    """The most alike adjacent pairs of these rows (`adjacent_similarity`), unprotected.

    keys, values: [L, H, S, D], keys rotated to each row's index; protected: [S] bool.
    """
    return select_similar_pairs(adjacent_similarity(keys, values, rope), protected, count)
