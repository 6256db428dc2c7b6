"""The worker's lean Llama forward against the library's: same logits, K/V and attention rows
(bit for bit in float32 here, to rounding in half precision), on every kind of pass the worker
runs (a step, a batch of tokens each alone at its own position, a prefix chunk), for the model
variants it claims (GQA, biases, RoPE scaling), and the library's forward for what it does not."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model_worker.forward import Rows, Slots, alone_mask, run
from model_worker.lean_llama import LeanLlama, unsupported
from model_worker.model import describe
from tests.worker_fixtures import word_tokenizer

VARIANTS = {
    "gqa": {},
    "mha-biases": {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True},
    "llama3-rope": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    },
    "linear-rope": {
        "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    },
    "yarn-rope": {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    },
}


def _model(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    tok = word_tokenizer()
    settings = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config = LlamaConfig(**{**settings, **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # random biases: the zero init would hide a missing one
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return describe("tiny", model, tok)


def _rows(lm, count: int, room: int, first: int = 0, seed: int = 1) -> Rows:
    """`count` random live rows at slots [first, first + count), `room` free slots after them."""
    g = lm.geometry
    gen = torch.Generator().manual_seed(seed)
    shape = (g.num_layers, g.num_kv_heads, first + count + room, g.head_dim)
    keys = torch.randn(shape, generator=gen).to(g.dtype)
    values = torch.randn(shape, generator=gen).to(g.dtype)
    ids = torch.randint(3, lm.vocab_size, (count,), generator=gen).tolist()
    live = slice(first, first + count)
    return Rows(keys[:, :, live], values[:, :, live], ids, 7, Slots(keys, values, first))


def _both(lm, make_rows, *args, **kwargs):
    """run() through the lean forward, then through the library's, over identical rows."""
    lean = lm.lean
    assert lean is not None
    out = []
    for impl in (lean, None):
        lm.lean = impl
        p = run(lm, make_rows(), *args, **kwargs)
        att = p.attention.clone() if p.attention is not None else None
        out.append((p.logits.clone(), p.kv.keys.clone(), p.kv.values.clone(), att))
    lm.lean = lean
    return out


def _passes(lm):
    """(rows maker, run args): a step, queries alone at several positions, a causal chunk."""
    n = 12
    step_rows = lambda: _rows(lm, n, 4, first=3)  # noqa: E731
    alone = [2, 5, 9, n]
    return [
        (step_rows, ([4], [7 + n]), {"reduction": "last"}),
        (step_rows, ([4], [7 + n]), {"reduction": "mean"}),
        (
            step_rows,
            ([5, 6, 8, 4], [7 + p for p in alone], alone_mask(n, alone, lm.device)),
            {"keep": range(4), "reduction": "max"},
        ),
        (lambda: _rows(lm, n, 6), ([3, 4, 5, 6, 7], list(range(7 + n, 12 + n))), {"keep": [0, 4]}),
        (lambda: _rows(lm, 0, 6), ([1, 4, 5], [0, 1, 2]), {"keep": range(3), "reduction": "last"}),
    ]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_lean_forward_is_the_librarys_bit_for_bit_in_float32(variant):
    lm = _model(**VARIANTS[variant])
    assert lm.lean is not None
    for make_rows, args, kwargs in _passes(lm):
        lean, ref = _both(lm, make_rows, *args, **kwargs)
        for a, b in zip(lean, ref, strict=True):
            if b is None:
                assert a is None
                continue
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_lean_forward_matches_the_library_in_half_precision(dtype):
    lm = _model(dtype)
    for make_rows, args, kwargs in _passes(lm):
        lean, ref = _both(lm, make_rows, *args, **kwargs)
        for a, b in zip(lean, ref, strict=True):
            if b is not None:
                assert a.dtype == b.dtype
                torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_the_lean_forward_writes_only_the_free_slots():
    lm = _model()
    rows = _rows(lm, 10, 5, first=2)
    assert rows.slots is not None
    before_k, before_v = rows.slots.keys.clone(), rows.slots.values.clone()
    run(lm, rows, [4, 5], [17, 18], reduction="last")
    written = slice(12, 14)
    for after, before in ((rows.slots.keys, before_k), (rows.slots.values, before_v)):
        assert torch.equal(after[:, :, :12], before[:, :, :12])  # live rows and the slots before
        assert torch.equal(after[:, :, 14:], before[:, :, 14:])
        assert not torch.equal(after[:, :, written], before[:, :, written])


def test_models_it_cannot_reproduce_keep_the_librarys_forward():
    lm = _model(hidden_act="gelu")
    assert unsupported(lm.model) is not None and lm.lean is None
    with pytest.raises(ValueError, match="activation"):
        LeanLlama(lm.model)
    sliding = _model(layer_types=["full_attention", "sliding_attention", "full_attention"])
    assert sliding.lean is None
    # (the worker refuses such models at load; the lean forward would not follow them either)
    config = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4,
                                                "factor": 2.0},
    )  # fmt: skip
    assert "RoPE type 'dynamic'" in str(unsupported(LlamaForCausalLM(config)))


def test_forward_hf_asks_for_the_librarys_forward():
    tok = word_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    assert describe("x", LlamaForCausalLM(config), tok).lean is not None
    assert describe("x", LlamaForCausalLM(config), tok, "hf").lean is None
    with pytest.raises(ValueError, match="forward"):
        describe("x", LlamaForCausalLM(config), tok, "fast")
