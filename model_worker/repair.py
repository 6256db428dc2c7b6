"""Repair: ranked single-token replacements for an adjacent pair of rows (the Halo Weave merge).

A repairer is one policy per file (`lm_repair.py`, `mlm_repair.py`); this module holds what they
share: the candidate type, pair validation, the ids no repairer may propose, and the factory.

Choices: special tokens (BOS, EOS, pad, unk, every id the tokenizer lists as special, and ids past
the tokenizer's vocabulary) are never proposed. The pair's own tokens may be: merging
("big", "dog") into "dog" is a legitimate one-token summary, and the driver can refuse it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from model_worker.errors import WorkerError, invalid
from model_worker.forward import Rows
from model_worker.model import LoadedModel
from positronic.special_tokens import decode_pieces

DEFAULT_CANDIDATES = 5
MAX_CANDIDATES = 100
PIECE_CONTEXT_ROWS = 8  # rows of left context a candidate's piece is decoded after


@dataclass(frozen=True)
class Candidate:
    token_id: int
    piece: str  # its text after the rows before the pair
    score: float  # higher is better, comparable within one pair


@dataclass(frozen=True)
class PairRef:
    position: int  # row index of the pair's first row
    expected_token_ids: tuple[int, ...]


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


def piece_after(lm: LoadedModel, rows: Rows, position: int, token_id: int) -> str:
    """The text `token_id` adds after the rows just before `position`."""
    context = list(rows.token_ids[max(0, position - PIECE_CONTEXT_ROWS) : position])
    return decode_pieces(lm.tokenizer, [token_id], context=context)[0]


def check_pairs(rows: Rows, pairs: Sequence[PairRef], max_candidates: int) -> int:
    """Validate every pair before computing anything; returns the candidate count to use."""
    if max_candidates < 0:
        raise invalid(f"max_candidates must be >= 0, got {max_candidates}")
    for i, pair in enumerate(pairs):
        p = pair.position
        if p < 0 or p + 1 >= rows.count:
            raise invalid(f"pair {i}: position {p} needs rows {p}, {p + 1} of {rows.count}")
        if len(pair.expected_token_ids) != 2:
            raise invalid(f"pair {i}: needs 2 expected token ids")
        actual = list(rows.token_ids[p : p + 2])
        if actual != list(pair.expected_token_ids):
            raise WorkerError(
                "FAILED_PRECONDITION",
                f"pair {i}: expected tokens {list(pair.expected_token_ids)} at {p}, "
                f"the replica holds {actual}",
            )
    return min(max_candidates or DEFAULT_CANDIDATES, MAX_CANDIDATES)


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
