"""RoPE re-rotation: editing rows then re-rotating equals recomputing the edited sequence, and
rotations never accumulate error (DESIGN.md invariant 5)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cache_authority.ops import AppendOp, EvictOp, ReplacePairOp
from cache_authority.state import Budget, Geometry, SessionState, apply_ops
from positronic.rope import Rope, rerotate_from_canonical, rotate_keys


def tiny_llama(rope_parameters=None, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def layer0_keys(model, ids: list[int], first_position: int = 0) -> torch.Tensor:
    """Layer-0 keys after RoPE, [H, S, D], from a from-scratch forward at positions
    first_position, first_position + 1, ..."""
    positions = torch.arange(first_position, first_position + len(ids))[None]
    with torch.no_grad():
        out = model(torch.tensor([ids]), position_ids=positions, use_cache=True)
    return out.past_key_values.layers[0].keys[0]


IDS = [5, 17, 33, 2, 80, 41, 9, 64, 12, 3, 55, 28]


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_rope_from_config_matches_the_model(rope_parameters):
    model = tiny_llama(rope_parameters)
    rope = Rope.from_config(model.config)
    assert torch.allclose(rope.inv_freq, model.model.rotary_emb.inv_freq.float(), rtol=0, atol=0)
    assert rope.attention_scaling == pytest.approx(model.model.rotary_emb.attention_scaling)


def test_dynamic_rope_is_refused():
    config = tiny_llama().config
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="dynamic"):
        Rope.from_config(config)


LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.0, 1.0, 1.0],
    "long_factor": [1.0, 2.0, 4.0, 8.0],
    "original_max_position_embeddings": 64,
}


def test_longrope_is_refused_at_load():
    """Issue 12: accepted before, though past its original context longrope switches to other
    frequencies, so one fixed inv_freq re-rotates its keys wrongly."""
    from model_worker.model import describe
    from tests.worker_fixtures import word_tokenizer

    model = tiny_llama(dict(LONGROPE))
    with pytest.raises(ValueError, match=r"longrope.*sequence length"):
        Rope.from_config(model.config)
    with pytest.raises(ValueError, match="longrope"):
        describe("tiny-longrope", model, word_tokenizer())


@pytest.mark.parametrize("head_dim, theta", [(8, 10000.0), (64, 10000.0), (128, 500000.0)])
def test_default_inv_freq_is_the_models_bit_for_bit(head_dim, theta):
    """HF computes the default frequencies in float32; a float64 computation differs in the
    last bits (up to 6e-8 here) and so did every key re-rotated with it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=11,
        hidden_size=head_dim * 2,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    model = LlamaForCausalLM(config)
    want = model.model.rotary_emb.inv_freq
    assert Rope.from_config(config).inv_freq.dtype == want.dtype == torch.float32
    assert torch.equal(Rope.from_config(config).inv_freq, want)
    assert torch.equal(Rope.from_theta(head_dim, theta).inv_freq, want)


def test_stories260k_inv_freq_is_the_models_bit_for_bit(stories260k_dir):
    from tests.worker_fixtures import stories

    lm = stories(str(stories260k_dir))
    assert torch.equal(lm.geometry.rope.inv_freq, lm.model.model.rotary_emb.inv_freq)


@pytest.mark.parametrize("drop", [0, 3, 7, 11])
def test_dropping_a_row_then_rerotating_equals_recompute(drop):
    model = tiny_llama()
    rope = Rope.from_config(model.config)
    keys = layer0_keys(model, IDS)  # [H, S, D]
    kept = [i for i in range(len(IDS)) if i != drop]
    origin = torch.tensor(kept)
    moved = rerotate_from_canonical(keys[:, kept], origin, torch.arange(len(kept)), rope)
    expected = layer0_keys(model, [IDS[i] for i in kept])
    assert torch.allclose(moved, expected, atol=1e-5, rtol=0)
    # Without re-rotation the rows after the drop would be wrong: the test can fail.
    if drop < len(IDS) - 1:
        assert not torch.allclose(keys[:, kept], expected, atol=1e-3)


def test_attention_scaling_is_not_applied_twice():
    model = tiny_llama(
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    )
    rope = Rope.from_config(model.config)
    assert rope.attention_scaling != 1.0
    keys = layer0_keys(model, IDS)
    kept = list(range(1, len(IDS)))
    moved = rerotate_from_canonical(
        keys[:, kept], torch.tensor(kept), torch.arange(len(kept)), rope
    )
    assert torch.allclose(moved, layer0_keys(model, IDS[1:]), atol=1e-5, rtol=0)


def test_session_ops_rerotate_to_the_recomputed_sequence():
    """Evict and ReplacePair through a replica's state: layer-0 keys equal a from-scratch
    forward over the edited sequence at the rows' positions (offset + index; the merged token's
    own K/V computed at its position before the patch)."""
    model = tiny_llama()
    rope = Rope.from_config(model.config)
    cfg = model.config
    geometry = Geometry(
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        cfg.head_dim,
        torch.float32,
        rope,
        cfg.vocab_size,
    )
    state = SessionState("s", geometry, Budget(16, 16), rotated=True)
    with torch.no_grad():
        cache = model(torch.tensor([IDS]), use_cache=True).past_key_values
    k = torch.stack([layer.keys[0] for layer in cache.layers])  # [L, H, S, D]
    v = torch.stack([layer.values[0] for layer in cache.layers])
    apply_ops(state, [AppendOp(0, tuple(IDS), k, v)], 1, b"")
    # Merge rows (2, 3) into token 90, evict row 8. Edited sequence:
    edited = [*IDS[:2], 90, *IDS[4:8], *IDS[9:]]
    merged_k = layer0_keys(model, [*IDS[:2], 90])[:, 2:3]  # computed at position 2
    kk = torch.zeros(2, 2, 1, cfg.head_dim)
    kk[0] = merged_k
    apply_ops(
        state,
        [ReplacePairOp(2, (IDS[2], IDS[3]), 90, kk, kk.clone()), EvictOp(8, IDS[8])],
        2,
        b"",
    )
    assert state.live_token_ids() == edited
    assert state.position_offset == 1  # the merge moved the 2 rows before it, not the 8 after
    expected = layer0_keys(model, edited, state.position_offset)
    assert torch.allclose(state.live_keys()[0], expected, atol=1e-5, rtol=0)


@pytest.mark.timeout(1200)  # 10,000 patches; about 25 s on an idle 2-core machine
def test_ten_thousand_shifts_do_not_accumulate_error_bf16():
    """Evict row 1 ten thousand times: row 0 (the shorter side) moves up 10,000 positions one
    step at a time, and its key still equals ONE rotation of its canonical key (bf16 within
    its rounding)."""
    shifts = 10_000
    n = shifts + 8
    d = 16
    rope = Rope.from_theta(d, 10000.0)
    geometry = Geometry(1, 1, d, torch.bfloat16, rope, 32)
    state = SessionState("s", geometry, Budget(n, n), rotated=True)
    g = torch.Generator().manual_seed(0)
    canonical = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    origins = torch.arange(n)
    stored = rotate_keys(canonical.float(), origins, rope).to(torch.bfloat16)  # as computed at p
    tokens = tuple(int(t) for t in torch.randint(0, 32, (n,), generator=g))
    apply_ops(state, [AppendOp(0, tokens, stored, stored.clone())], 1, b"")
    naive = stored[0, 0, 0].clone()  # what accumulating one +1 rotation per tick would give
    for version in range(2, shifts + 2):
        apply_ops(state, [EvictOp(1, state.row_token_ids(1, 2)[0])], version, b"")
        naive = rotate_keys(naive[None, None, None], torch.tensor([1]), rope)[0, 0, 0]
    assert state.row_count == n - shifts and state.position_offset == shifts
    first = state.live_keys()[0, 0, 0].double()
    exact = rotate_keys(canonical[:, :, :1], torch.tensor([shifts]), rope)[0, 0, 0]
    # One bf16 rounding of the canonical key plus one of the result: |err| <= ~2^-7 |x|.
    tol = 2**-7 * exact.abs().max().item() + 1e-2
    assert (first - exact).abs().max().item() < tol
    assert int(state.live_origin_positions()[0]) == 0
    # Accumulating rotations destroys the key: the same check fails for the naive path.
    assert (naive.double() - exact).abs().max().item() > 10 * tol
