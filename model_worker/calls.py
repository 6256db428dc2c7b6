"""The worker's computations as plain functions: validate a request, forward, sample.

The servicer turns protos into the arguments here and the results back into protos; these
functions never see gRPC. Malformed requests raise WorkerError(INVALID_ARGUMENT); a position past
the model's trained positions is RESOURCE_EXHAUSTED (over a limit, not malformed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from model_worker import forward, sampling
from model_worker.attention import LAST_LAYER
from model_worker.errors import WorkerError, invalid
from model_worker.forward import KV, Rows, StepOutput
from model_worker.limits import MAX_IDS, MAX_INSERTIONS, MAX_TOP_LOGPROBS, check_count, over
from model_worker.model import LoadedModel

DEFAULT_CHUNK_TOKENS = 256


@dataclass(frozen=True)
class StepParams:
    input_token_id: int
    sampling: sampling.Sampling = field(default_factory=sampling.Sampling)
    top_logprobs: int = 0
    forced_next_token_id: int | None = None
    reduction: str = LAST_LAYER
    return_logits: bool = False


@dataclass
class StepResult:
    next_token_id: int
    next_token_logprob: float  # under the unpenalised, temperature-1 distribution
    top_logprobs: list[tuple[int, float]]
    output: StepOutput
    logits: torch.Tensor | None  # [V] float32 when asked for


def check_token(lm: LoadedModel, token_id: int, what: str) -> None:
    if not 0 <= token_id < lm.vocab_size:
        raise invalid(f"{what}: token id {token_id} outside the vocabulary [0, {lm.vocab_size})")


def check_positions(lm: LoadedModel, first: int, count: int, what: str) -> None:
    last = first + count - 1
    if lm.max_positions and last >= lm.max_positions:
        raise WorkerError(
            "RESOURCE_EXHAUSTED",
            f"{what}: position {last} is past the model's {lm.max_positions} positions",
        )


def check_step(lm: LoadedModel, params: StepParams) -> None:
    """What can be checked without the replica (so that it is checked before syncing)."""
    check_token(lm, params.input_token_id, "input token")
    if params.forced_next_token_id is not None:
        check_token(lm, params.forced_next_token_id, "forced next token")
    if params.top_logprobs < 0:
        raise invalid(f"top_logprobs must be >= 0, got {params.top_logprobs}")
    if params.top_logprobs > MAX_TOP_LOGPROBS:
        raise over("top_logprobs", params.top_logprobs, MAX_TOP_LOGPROBS)


def step(lm: LoadedModel, rows: Rows, params: StepParams) -> StepResult:
    """Forward the input token at position rows.count; sample (or force) the next token."""
    check_step(lm, params)
    check_positions(lm, rows.count, 1, "step")
    return choose_next(
        rows, params, forward.step(lm, rows, params.input_token_id, params.reduction)
    )


def choose_next(rows: Rows, params: StepParams, out: StepOutput) -> StepResult:
    """Sample (or force) the next token from the input token's logits."""
    logprobs = out.logits.log_softmax(dim=-1)
    if params.forced_next_token_id is not None:
        next_id = params.forced_next_token_id
    else:
        present = [*rows.token_ids, params.input_token_id]
        next_id = sampling.sample(out.logits, params.sampling, present)
    return StepResult(
        next_token_id=next_id,
        next_token_logprob=float(logprobs[next_id]),
        top_logprobs=sampling.top_logprobs(logprobs, params.top_logprobs),
        output=out,
        logits=out.logits if params.return_logits else None,
    )


def check_tokens(lm: LoadedModel, token_ids: Sequence[int], what: str) -> None:
    check_count(f"{what}s", token_ids, MAX_IDS)
    for i, t in enumerate(token_ids):
        check_token(lm, t, f"{what} {i}")


def check_insertions(lm: LoadedModel, insertions: Sequence[tuple[int, int]]) -> None:
    """What can be checked without the replica (so before syncing)."""
    check_count("insertions", insertions, MAX_INSERTIONS)
    for i, (position, token_id) in enumerate(insertions):
        if position < 0:
            raise invalid(f"insertion {i}: position {position} is negative")
        check_token(lm, token_id, f"insertion {i}")


def compute_kv(lm: LoadedModel, rows: Rows, insertions: Sequence[tuple[int, int]]) -> list[KV]:
    """K/V of each (position, token) over the rows before it. All are checked before any runs."""
    check_insertions(lm, insertions)
    for i, (position, _) in enumerate(insertions):
        if not 0 <= position <= rows.count:
            raise invalid(f"insertion {i}: position {position} outside [0, {rows.count}]")
        check_positions(lm, position, 1, f"insertion {i}")
    return forward.compute_kv(lm, rows, insertions)


def check_prefill(
    lm: LoadedModel, row_count: int, token_ids: Sequence[int], start: int, chunk_tokens: int
) -> int:
    """Validate a Prefill request; returns the chunk size to forward with."""
    if not token_ids:
        raise invalid("prefill needs at least one token")
    if len(token_ids) > MAX_IDS:
        raise over("prefill tokens", len(token_ids), MAX_IDS)
    if not 0 <= start <= row_count:
        raise invalid(f"start_position {start} outside [0, {row_count}]")
    if chunk_tokens < 0:
        raise invalid(f"chunk_tokens must be >= 0, got {chunk_tokens}")
    check_tokens(lm, token_ids, "token")
    check_positions(lm, start, len(token_ids), "prefill")
    return chunk_tokens or DEFAULT_CHUNK_TOKENS


def prefill(
    lm: LoadedModel,
    context: Rows,
    token_ids: Sequence[int],
    chunk_tokens: int,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[int, KV]]:
    """K/V of token_ids after `context` (already cut to the start position)."""
    return forward.prefill(lm, context, token_ids, context.count, chunk_tokens, progress)


def split_kv(first_index: int, kv: KV, max_bytes: int) -> Iterator[tuple[int, KV]]:
    """Cut a chunk's K/V along tokens so that keys and values together fit max_bytes."""
    n = kv.keys.shape[2]
    per_token = 2 * kv.keys[:, :, :1].numel() * kv.keys.element_size()
    step_n = max(1, max_bytes // max(per_token, 1))
    for i in range(0, n, step_n):
        yield first_index + i, KV(kv.keys[:, :, i : i + step_n], kv.values[:, :, i : i + step_n])
