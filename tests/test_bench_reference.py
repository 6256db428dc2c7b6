"""Reference NLLs: the batched sliding window equals a from-scratch forward of each window."""

from __future__ import annotations

import pytest
import torch

from positronic.bench.reference import full_cache_nll, sliding_window_nll, window_context


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def direct_nll(model, context: list[int], target: int) -> float:
    with torch.inference_mode():
        logits = model(torch.tensor([context])).logits[0, -1].double()
    return float(-logits.log_softmax(-1)[target])


def test_window_context():
    ids = list(range(100, 120))
    assert window_context(ids, 5, budget=8) == ids[:5]  # the whole prefix while it is short
    assert window_context(ids, 15, budget=8) == [ids[0], *ids[7:15]]
    assert len(window_context(ids, 19, budget=8)) == 8 + 1


@pytest.mark.parametrize("budget", [1, 6, 11])
def test_sliding_window_equals_direct_forward(tiny_model, budget):
    g = torch.Generator().manual_seed(budget)
    ids = [1, *torch.randint(3, 64, (40,), generator=g).tolist()]
    got = sliding_window_nll(tiny_model, ids, budget, batch_size=7)
    assert len(got) == len(ids) - 2
    for t in (2, 3, budget + 1, budget + 2, budget + 3, 25, len(ids) - 1):
        if 2 <= t < len(ids):
            want = direct_nll(tiny_model, window_context(ids, t, budget), ids[t])
            assert got[t - 2] == pytest.approx(want, abs=1e-4), t


def test_full_cache_and_a_window_that_holds_everything(tiny_model):
    ids = [1, *range(5, 35)]
    full = full_cache_nll(tiny_model, ids)
    assert full[-1] == pytest.approx(direct_nll(tiny_model, ids[:-1], ids[-1]), abs=1e-4)
    assert sliding_window_nll(tiny_model, ids, budget=len(ids)) == pytest.approx(full, abs=1e-4)
