"""One iteration's read-only work (the Tick RPC) as plain functions: the step and the repairs.

One batched forward holds the input token (always its last query: attention.py reads the newest
query's row) and whatever the repairer needs computed over the same rows — for `lm`, the row
before each pair re-fed at its own position (p(x | rows < p)); for `mlm`, the masked LM's
replacement at the pair's position, whose K/V that pass gives. `lm` then scores its candidates in
one more pass (lm_repair.py), as does `pair_lm` (pair_repair.py); `kv_merge` needs no pass
(kv_merge.py). So a Tick runs one forward, two on an `lm` or `pair_lm` tick that merges. The
masked LM's own forward is not counted: `forwards` counts passes of the causal model.

Every check that can run before the replica is read runs first (`check_tick`), and everything
about the rows before any forward (`check_pairs`): a refused Tick computes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model_worker.calls import StepParams, StepResult, check_positions, check_step, choose_next
from model_worker.errors import WorkerError, invalid
from model_worker.forward import KV, Rows, StepOutput, alone_mask, run
from model_worker.kv_merge import ATTENTION, EQUAL, HEAVIER, MEAN, merge_pairs
from model_worker.limits import (
    MAX_CANDIDATES,
    MAX_PAIRS,
    check_count,
    check_repair_work,
    over,
)
from model_worker.lm_repair import LMRepairer
from model_worker.model import LoadedModel
from model_worker.pair_repair import PairLMRepairer
from model_worker.repair import (
    DEFAULT_CANDIDATES,
    Candidate,
    PairRef,
    Repairer,
    Replacement,
    check_pair_rows,
)

LM, MLM, KV_MERGE, PAIR_LM = "lm", "mlm", "kv_merge", "pair_lm"


@dataclass(frozen=True)
class RepairChoice:
    """How a Tick builds the replacements of its pairs (RepairParams)."""

    repairer: str = LM  # lm | mlm | kv_merge | pair_lm
    max_candidates: int = 0  # lm / mlm: candidates ranked per pair; 0: DEFAULT_CANDIDATES
    kv_weights: str = ATTENTION  # kv_merge: attention | equal
    kv_key: str = MEAN  # kv_merge: mean | heavier


@dataclass(frozen=True)
class TickParams:
    step: StepParams
    merges: tuple[PairRef, ...] = ()
    repair: RepairChoice = field(default_factory=RepairChoice)


@dataclass
class Repairers:
    """What this worker can repair with: the causal model always, a masked LM when loaded."""

    lm: LMRepairer
    mlm: Repairer | None = None
    default: str = LM  # the worker's --repair: what REPAIRER_UNSPECIFIED means
    configured: Repairer | None = None  # the Repair RPC's repairer (default: by `default`)

    @property
    def for_repair_rpc(self) -> Repairer:
        if self.configured is not None:
            return self.configured
        return self.mlm if self.default == MLM and self.mlm is not None else self.lm


@dataclass
class PairMerge:
    position: int
    merged: bool  # False: no single token fits; the caller evicts a row of the pair instead
    token_id: int = 0
    piece: str = ""
    kv: KV | None = None  # [L, H, 1, D] at position_offset + position
    score: float = 0.0
    replaced_text: str = ""


@dataclass
class TickResult:
    step: StepResult
    next_piece: str  # vocabulary piece of the next token
    next_bytes: bytes  # the bytes it adds to the text (special tokens: none)
    merges: list[PairMerge]
    forwards: int
    forward_ns: int


def check_tick(lm: LoadedModel, params: TickParams, repairers: Repairers) -> str:
    """What can be checked without the replica; returns the repairer to use."""
    check_step(lm, params.step)
    repair = params.repair
    kind = repair.repairer or repairers.default
    if kind not in (LM, MLM, KV_MERGE, PAIR_LM):
        raise invalid(f"unknown repairer {kind!r}")
    if kind == MLM and repairers.mlm is None:
        raise WorkerError("FAILED_PRECONDITION", "this worker has no masked LM (--repair mlm)")
    if repair.max_candidates < 0:
        raise invalid(f"max_candidates must be >= 0, got {repair.max_candidates}")
    if repair.max_candidates > MAX_CANDIDATES:
        raise over("max_candidates", repair.max_candidates, MAX_CANDIDATES)
    if repair.kv_weights not in (ATTENTION, EQUAL) or repair.kv_key not in (MEAN, HEAVIER):
        raise invalid("unknown kv_weights or kv_key")
    check_count("merges", params.merges, MAX_PAIRS)
    if kind in (LM, MLM):
        check_repair_work(len(params.merges), repair.max_candidates or DEFAULT_CANDIDATES)
    previous = -2
    for i, pair in enumerate(sorted(params.merges, key=lambda m: m.position)):
        if len(pair.expected_token_ids) != 2:
            raise invalid(
                f"pair {i}: needs 2 expected token ids, got {len(pair.expected_token_ids)}"
            )
        if pair.position < 0:
            raise invalid(f"pair {i}: position {pair.position} is negative")
        if pair.position < previous + 2:
            raise invalid(f"pairs at {previous} and {pair.position} overlap")
        previous = pair.position
        if pair.weights:
            if kind != KV_MERGE:
                raise invalid(f"pair {i}: weights are for the K/V-merge repairer only")
            w = pair.weights
            if len(w) != 2 or not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
                raise invalid(f"pair {i}: weights must be two finite values >= 0, not both 0")
    return kind


def check_pairs(lm: LoadedModel, rows: Rows, pairs: Sequence[PairRef]) -> None:
    """Against the replica: the input token fits the positions; every pair lies within the rows
    (never touching the new one) and holds the tokens the caller expects."""
    check_positions(lm, rows.count, 1, "tick")
    check_pair_rows(rows, pairs)


def tick(lm: LoadedModel, rows: Rows, params: TickParams, repairers: Repairers) -> TickResult:
    kind = check_tick(lm, params, repairers)
    pairs = params.merges
    check_pairs(lm, rows, pairs)
    k = params.repair.max_candidates or DEFAULT_CANDIDATES
    token = params.step.input_token_id
    n = rows.count
    # The step's pass: what the repairer needs over the same rows first, the input token last.
    before: list[tuple[int, int]] = []  # (token, row index it is computed at, alone over rows < it)
    if pairs and kind == LM:
        before = repairers.lm.left_queries(rows, pairs)
    mlm_best: list[Candidate | None] = []
    if pairs and kind == MLM:
        assert repairers.mlm is not None
        for pair in pairs:
            ranked = repairers.mlm.candidates(rows, pair.position, k)
            mlm_best.append(ranked[0] if ranked else None)
            if ranked:
                before.append((ranked[0].token_id, pair.position))
    q = len(before) + 1
    out = run(
        lm,
        rows,
        [t for t, _ in before] + [token],
        [rows.position(r) for _, r in before] + [rows.position(n)],
        alone_mask(n, [r for _, r in before] + [n], lm.device) if before else None,
        keep=range(q) if kind == LM else [q - 1],
        reduction=params.step.reduction,
    )
    assert out.attention is not None
    attention = torch.cat([out.attention[:n], out.attention[n + q - 1 :]])  # rows, then itself
    input_kv = KV(out.kv.keys[:, :, q - 1 :], out.kv.values[:, :, q - 1 :]).clone()
    step_out = StepOutput(out.logits[-1].cpu(), input_kv, attention, rows.position(n), 0)
    forwards, forward_ns = 1, out.forward_ns
    replacements: list[Replacement | None] = []
    if pairs and kind == LM:
        replacements, extra, extra_ns = repairers.lm.replace(rows, pairs, out.logits[:-1], token, k)
        forwards, forward_ns = forwards + extra, forward_ns + extra_ns
    elif pairs and kind == MLM:
        j = 0
        for best in mlm_best:
            if best is None:
                replacements.append(None)
                continue
            kv = KV(out.kv.keys[:, :, j : j + 1], out.kv.values[:, :, j : j + 1]).clone()
            replacements.append(Replacement(best.token_id, kv.keys, kv.values, best.score))
            j += 1
    elif pairs and kind == PAIR_LM:
        replacements, extra, extra_ns = PairLMRepairer(lm).replace(rows, pairs)
        forwards, forward_ns = forwards + extra, forward_ns + extra_ns
    elif pairs:
        repair = params.repair
        replacements = list(
            merge_pairs(
                rows,
                pairs,
                attention,
                lm.geometry.rope,
                weights=repair.kv_weights,
                key=repair.kv_key,
            )
        )
    step_out.forward_ns = forward_ns
    result = choose_next(rows, params.step, step_out)
    nxt = result.next_token_id
    return TickResult(
        step=result,
        next_piece=_piece(lm, nxt),
        next_bytes=_bytes(lm, nxt),
        merges=[
            _pair_merge(lm, rows, pair, r) for pair, r in zip(pairs, replacements, strict=True)
        ],
        forwards=forwards,
        forward_ns=forward_ns,
    )


def _piece(lm: LoadedModel, token_id: int) -> str:
    """The vocabulary piece; ids past the tokenizer's vocabulary (padding rows) have none."""
    table = lm.table
    return table.pieces[token_id] if token_id < len(table) else ""


def _bytes(lm: LoadedModel, token_id: int) -> bytes:
    """The bytes the id adds to generated text: none for special tokens and padding ids."""
    table = lm.table
    if token_id >= len(table) or token_id in table.special:
        return b""
    return table.text_bytes[token_id]


def _pair_merge(lm: LoadedModel, rows: Rows, pair: PairRef, r: Replacement | None) -> PairMerge:
    p = pair.position
    text = b"".join(_bytes(lm, t) for t in rows.token_ids[p : p + 2]).decode(errors="replace")
    if r is None:
        return PairMerge(p, False, replaced_text=text)
    return PairMerge(
        p, True, r.token_id, _piece(lm, r.token_id), KV(r.keys, r.values), r.score, text
    )
