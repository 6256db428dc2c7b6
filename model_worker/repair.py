"""Repair: ranked single-token replacements for an adjacent pair of rows (the Halo Weave merge).

A repairer is one policy per file (`lm_repair.py`, `mlm_repair.py`, `kv_merge.py`); this module
holds what they share: the candidate and replacement types, pair validation, the ids no repairer
may propose, and the factory.

Choices: special tokens (BOS, EOS, pad, unk, every id the tokenizer lists as special, and ids past
the tokenizer's vocabulary) are never proposed. The pair's own tokens may be: merging
("big", "dog") into "dog" is a legitimate one-token summary, and the driver can refuse it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from model_worker.errors import WorkerError, invalid
from model_worker.forward import Rows
from model_worker.limits import MAX_CANDIDATES, MAX_PAIRS, check_count, check_repair_work, over
from model_worker.model import LoadedModel

DEFAULT_CANDIDATES = 5


@dataclass(frozen=True)
class Candidate:
    token_id: int
    piece: str  # its vocabulary piece ("▁dog"), as the mirror records it
    score: float  # higher is better, comparable within one pair


@dataclass(frozen=True)
class PairRef:
    position: int  # row index of the pair's first row
    expected_token_ids: tuple[int, ...]
    weights: tuple[float, ...] = ()  # K/V merge: the caller's weights of the two rows


@dataclass(frozen=True)
class Replacement:
    """What replaces a pair in a Tick: one token and its K/V at the pair's first position."""

    token_id: int
    keys: torch.Tensor  # [L, H, 1, D], canonical: computed at position_offset + position
    values: torch.Tensor  # [L, H, 1, D]
    score: float  # the repairer's, higher is better


class Repairer(Protocol):
    name: str

    def candidates(self, rows: Rows, position: int, max_candidates: int) -> list[Candidate]:
        """Best first; at most max_candidates; the pair is rows (position, position + 1)."""
        ...


def banned_ids(lm: LoadedModel) -> set[int]:
    """Ids a repairer never proposes: special tokens and ids the tokenizer cannot decode."""
    s = lm.special
    banned = {i for i in (s.bos, s.eos, s.pad, s.unk) if i is not None} | set(s.all)
    banned |= set(range(len(lm.tokenizer), lm.vocab_size))  # type: ignore[arg-type]
    return banned


def candidate(lm: LoadedModel, token_id: int, score: float) -> Candidate:
    return Candidate(token_id, lm.table.pieces[token_id], score)


def check_request(pairs: Sequence[PairRef], max_candidates: int) -> int:
    """What can be checked without the replica (so before syncing); returns the candidate
    count to use."""
    check_count("pairs", pairs, MAX_PAIRS)
    if max_candidates < 0:
        raise invalid(f"max_candidates must be >= 0, got {max_candidates}")
    if max_candidates > MAX_CANDIDATES:
        raise over("max_candidates", max_candidates, MAX_CANDIDATES)
    check_repair_work(len(pairs), max_candidates or DEFAULT_CANDIDATES)
    for i, pair in enumerate(pairs):
        if len(pair.expected_token_ids) != 2:
            got = len(pair.expected_token_ids)
            raise invalid(f"pair {i}: needs 2 expected token ids, got {got}")
    return max_candidates or DEFAULT_CANDIDATES


def check_pairs(rows: Rows, pairs: Sequence[PairRef], max_candidates: int) -> int:
    """Validate every pair before computing anything; returns the candidate count to use."""
    k = check_request(pairs, max_candidates)
    check_pair_rows(rows, pairs)
    return k


def check_pair_rows(rows: Rows, pairs: Sequence[PairRef]) -> None:
    """Each pair names two rows the replica holds, and the tokens it expects there."""
    for i, pair in enumerate(pairs):
        p = pair.position
        if p < 0 or p + 1 >= rows.count:
            raise invalid(f"pair {i}: position {p} needs rows {p}, {p + 1} of {rows.count}")
        actual = list(rows.token_ids[p : p + 2])
        if actual != list(pair.expected_token_ids):
            raise WorkerError(
                "FAILED_PRECONDITION",
                f"pair {i}: expected tokens {list(pair.expected_token_ids)} at {p}, "
                f"the replica holds {actual}",
            )


def repair_pairs(
    repairer: Repairer, rows: Rows, pairs: Sequence[PairRef], max_candidates: int
) -> list[list[Candidate]]:
    k = check_pairs(rows, pairs, max_candidates)
    return [repairer.candidates(rows, pair.position, k) for pair in pairs]


def build_repairer(kind: str, lm: LoadedModel, masked_lm=None) -> Repairer:
    if kind == "lm":
        from model_worker.lm_repair import LMRepairer

        return LMRepairer(lm)
    if kind == "mlm":
        from model_worker.mlm_repair import MLMRepairer

        if masked_lm is None:
            raise ValueError("the mlm repairer needs a masked LM (--repair-model)")
        return MLMRepairer(lm, masked_lm)
    raise ValueError(f"unknown repairer {kind!r} (lm or mlm)")
