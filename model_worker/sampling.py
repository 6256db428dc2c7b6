"""Drawing the next token: repetition penalty, temperature, top-k, top-p, a seeded generator.

All arithmetic runs on CPU in float32 with a torch.Generator seeded from the request, so the same
logits and seed give the same token on any device (DESIGN.md invariant 7).

Ranges (model_worker.proto, SamplingParams): temperature 0 (greedy) or in (0, 100]; top_p in
[0, 1]; top_k >= 0; repetition_penalty 0 or 1 (none) or in [0.01, 100]. Within them the draw is
always defined: a temperature so small that logits / temperature overflow keeps only the largest
logits finite (the draw becomes greedy), never NaN probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

MAX_TEMPERATURE = 100.0
# Besides 0 and 1, which mean none. Bounds as float32 (the wire type), so 0.01 sent is accepted.
PENALTY_RANGE = (float(torch.tensor(0.01, dtype=torch.float32)), 100.0)
_FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 0.0  # 0 or 1 keeps every token
    repetition_penalty: float = 0.0  # 0 or 1 is none; > 1 penalises tokens already present
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.top_p > 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.temperature > MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE}]")
        low, high = PENALTY_RANGE
        if self.repetition_penalty not in (0.0, 1.0) and not low <= self.repetition_penalty <= high:
            raise ValueError(f"repetition_penalty must be 0, 1 or in [0.01, {high}]")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.seed < 2**64:
            raise ValueError("seed must fit in 64 unsigned bits")


def penalize(logits: torch.Tensor, present: Iterable[int], penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al., 2019): divide positive logits of present tokens by the penalty,
    multiply negative ones. logits: [V]."""
    if penalty in (0.0, 1.0):
        return logits
    ids = torch.tensor(sorted(set(present)), dtype=torch.long)
    if ids.numel() == 0:
        return logits
    out = logits.clone()
    picked = out[ids]
    out[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out.clamp(-_FLOAT32_MAX, _FLOAT32_MAX)  # huge logits / a small penalty stay finite


def scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature, [V]. When that overflows (temperature 1e-38), the largest logit is
    subtracted first: it becomes 0 and the rest finite or -inf, so softmax stays defined."""
    out = logits / temperature
    if bool(torch.isfinite(out).all()):
        return out  # the usual case, bit for bit
    return (logits - logits.max()) / temperature


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with everything outside the top-k and the top-p nucleus set to -inf. [V]."""
    out = logits.clone()
    if 0 < top_k < out.numel():
        kth = torch.topk(out, top_k).values[-1]
        out[out < kth] = float("-inf")
    if 0 < top_p < 1:
        probs, order = torch.sort(out.softmax(dim=-1), descending=True)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
        drop = order[before >= top_p]  # the first token always stays (before = 0)
        out[drop] = float("-inf")
    return out


def sample(logits: torch.Tensor, sampling: Sampling, present: Iterable[int] = ()) -> int:
    """The next token id for `logits` [V] (any device and dtype)."""
    x = penalize(logits.detach().float().cpu(), present, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return int(torch.argmax(x))
    x = filter_top_k_top_p(scale(x, sampling.temperature), sampling.top_k, sampling.top_p)
    probs = x.softmax(dim=-1)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(sampling.seed)
    return int(torch.multinomial(probs, 1, generator=gen))


def top_logprobs(logprobs: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The n most likely (token id, log-probability) pairs, most likely first."""
    n = min(n, logprobs.numel())
    if n <= 0:
        return []
    values, ids = torch.topk(logprobs, n)
    return [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
