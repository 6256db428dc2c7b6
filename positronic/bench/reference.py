"""Reference NLLs computed directly with the Hugging Face model (no services): the rows every
policy is compared with at the same budget.

- Sliding window with recompute (StreamingLLM's "sliding window with re-computation"): each token
  is scored from scratch over BOS + the `budget` tokens before it, all at positions 0.., so it
  sees exactly as many keys as the loop's Step does (`budget` cached rows + the input token).
- Full cache: one causal forward over the whole stream, where it fits the model's positions.

A stream's scored tokens are token_ids[2:]: the loop primes BOS, feeds token_ids[1] and then
predicts the rest (teacher forcing), so these arrays align with `LoopStats.nll` index by index.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FIRST_SCORED = 2  # token_ids[0] is BOS (primed), token_ids[1] the first input: not scored


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [N, V], targets [N] -> -log p(target) [N] in float64."""
    logp = logits.double().log_softmax(dim=-1)
    return -logp.gather(-1, targets[:, None]).squeeze(-1)


def window_context(token_ids: Sequence[int], t: int, budget: int) -> list[int]:
    """What predicts token_ids[t] in the sliding window: BOS + the last `budget` tokens
    before t (the whole prefix while it is shorter)."""
    if t < 1:
        raise ValueError("token 0 (BOS) has no context")
    start = max(1, t - budget)
    return [token_ids[0], *token_ids[start:t]]


@torch.inference_mode()
def sliding_window_nll(
    model, token_ids: Sequence[int], budget: int, batch_size: int = 64
) -> list[float]:
    """NLL of token_ids[2:], each predicted from `window_context` alone (recomputed)."""
    if budget < 1:
        raise ValueError("budget must be positive")
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    n = ids.numel()
    dev = next(model.parameters()).device
    out: list[float] = []
    # While the context is the whole prefix (t <= budget + 1), one forward scores them all.
    head = min(n, budget + 2)
    logits = model(ids[None, : head - 1].to(dev)).logits[0]  # [head - 1, V]
    tail = torch.arange(FIRST_SCORED, head)
    out += _token_nll(logits[tail - 1].cpu(), ids[tail]).tolist()
    # Later tokens: fixed-length windows [BOS, t - budget .. t - 1], batched.
    for first in range(head, n, batch_size):
        ts = torch.arange(first, min(n, first + batch_size))
        offsets = torch.arange(-budget, 0)
        windows = torch.cat(
            [ids[0].expand(ts.numel(), 1), ids[ts[:, None] + offsets[None, :]]], dim=1
        )  # [B, budget + 1]
        last = model(windows.to(dev), logits_to_keep=1).logits[:, -1]  # [B, V]
        out += _token_nll(last.cpu(), ids[ts]).tolist()
    return out


@torch.inference_mode()
def full_cache_nll(model, token_ids: Sequence[int]) -> list[float]:
    """NLL of token_ids[2:] with every earlier token in context (one causal forward)."""
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    dev = next(model.parameters()).device
    logits = model(ids[None, :-1].to(dev)).logits[0]  # [T - 1, V]
    t = torch.arange(FIRST_SCORED, ids.numel())
    return _token_nll(logits[t - 1].cpu(), ids[t]).tolist()


def max_positions(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


def load_reference_model(path: str):
    """The causal LM in float32 on CPU with sdpa attention (what the reference rows run)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model
