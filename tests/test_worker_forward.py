"""Read-only forwards over a replica equal monolithic HF forwards (fp32, tolerance 1e-4)."""

from __future__ import annotations

import pytest
import torch
from worker_fixtures import (
    append_op,
    commit,
    eager_copy,
    full_forward,
    kv_of,
    new_state,
    replica_of,
    rows_of,
    same,
    snapshot_of,
    stories,
    story_ids,
    tiny_llama,
)

from cache_authority.ops import AppendOp, EvictOp
from model_worker import calls, forward
from model_worker.attention import LAST_LAYER, MAX_LAYERS, MEAN_LAYERS
from model_worker.lm_repair import LMRepairer
from model_worker.repair import PairRef, repair_pairs

TOL = 1e-4


@pytest.fixture(scope="module", params=["stories260K", "tiny-random"])
def case(request):
    """(model, token ids): the real small model on real text, and a random tiny Llama."""
    if request.param == "stories260K":
        lm = stories(str(request.getfixturevalue("stories260k_dir")))
        return lm, story_ids(lm)
    lm = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    return lm, [1, *torch.randint(3, lm.vocab_size, (20,), generator=gen).tolist()]


def test_step_equals_monolithic_forward(case):
    lm, ids = case
    state = replica_of(lm, ids[:-1])
    out = forward.step(lm, rows_of(state), ids[-1])
    full = full_forward(lm, ids)
    assert out.position == len(ids) - 1
    torch.testing.assert_close(out.logits, full.logits[0, -1], atol=TOL, rtol=0)
    keys, values = kv_of(full)
    torch.testing.assert_close(out.kv.keys, keys[:, :, -1:], atol=TOL, rtol=0)
    torch.testing.assert_close(out.kv.values, values[:, :, -1:], atol=TOL, rtol=0)
    assert out.kv.keys.dtype == lm.dtype and out.kv.keys.shape == (
        lm.geometry.num_layers,
        lm.geometry.num_kv_heads,
        1,
        lm.geometry.head_dim,
    )


def test_successive_steps_equal_monolithic_forward(case):
    """Step, append its K/V the way the authority would, step again: still the full forward."""
    lm, ids = case
    state = replica_of(lm, ids[:4])
    for i in range(4, len(ids)):
        out = forward.step(lm, rows_of(state), ids[i])
        full = full_forward(lm, ids[: i + 1])
        torch.testing.assert_close(out.logits, full.logits[0, -1], atol=TOL, rtol=0)
        commit(state, [append_op(lm, [ids[i]], i, context=ids[:i])])


def test_attention_row_equals_eager(case):
    lm, ids = case
    state = replica_of(lm, ids[:-1])
    with torch.inference_mode():
        eager = eager_copy(lm)(
            input_ids=torch.tensor([ids]), output_attentions=True, use_cache=False
        )
    per_layer = torch.stack([a[0, :, -1, :].mean(dim=0) for a in eager.attentions])  # [L, N]
    expected = {
        LAST_LAYER: per_layer[-1],
        MEAN_LAYERS: per_layer.mean(dim=0),
        MAX_LAYERS: per_layer.max(dim=0).values,
    }
    for how, want in expected.items():
        row = forward.step(lm, rows_of(state), ids[-1], how).attention
        assert row.shape == (len(ids),)  # every row and the input token itself
        torch.testing.assert_close(row, want.float(), atol=1e-5, rtol=0)
    assert forward.step(lm, rows_of(state), ids[-1]).attention.sum().item() == pytest.approx(1.0)


def test_compute_kv_equals_forward_over_edited_prefix(case):
    lm, ids = case
    state = replica_of(lm, ids)
    replacement = ids[3]
    insertions = [(5, replacement), (1, ids[7]), (len(ids), ids[2])]
    kvs = calls.compute_kv(lm, rows_of(state), insertions)
    for (p, token), kv in zip(insertions, kvs, strict=True):
        keys, values = kv_of(full_forward(lm, [*ids[:p], token]))
        torch.testing.assert_close(kv.keys, keys[:, :, -1:], atol=TOL, rtol=0)
        torch.testing.assert_close(kv.values, values[:, :, -1:], atol=TOL, rtol=0)


@pytest.mark.parametrize("chunk_tokens", [3, 256])
def test_prefill_equals_monolithic_forward(case, chunk_tokens):
    lm, ids = case
    start = 6
    state = replica_of(lm, ids[:start] + [ids[0]] * 3)  # rows past start must be ignored
    rows = rows_of(state)
    chunks = list(calls.prefill(lm, rows.prefix(start), ids[start:], chunk_tokens))
    assert [first for first, _ in chunks] == list(range(0, len(ids) - start, chunk_tokens))
    keys = torch.cat([kv.keys for _, kv in chunks], dim=2)
    values = torch.cat([kv.values for _, kv in chunks], dim=2)
    want_k, want_v = kv_of(full_forward(lm, ids))
    torch.testing.assert_close(keys, want_k[:, :, start:], atol=TOL, rtol=0)
    torch.testing.assert_close(values, want_v[:, :, start:], atol=TOL, rtol=0)


def test_alternatives_equal_one_forward_each(case):
    lm, ids = case
    rows = rows_of(replica_of(lm, ids))
    p, alternatives = 6, [ids[6], ids[2], ids[9], 3]
    batched = forward.alternatives_logits(lm, rows, p, alternatives)
    for i, token in enumerate(alternatives):
        one = forward.next_token_logits(lm, rows, token, p)
        torch.testing.assert_close(batched[i], one, atol=TOL, rtol=0)


def test_split_kv_respects_the_byte_limit(case):
    lm, ids = case
    (_, kv), *_ = calls.prefill(lm, rows_of(replica_of(lm, ids[:1])).prefix(0), ids, 256)
    per_token = lm.geometry.row_bytes
    parts = list(calls.split_kv(0, kv, 3 * per_token))
    assert all(p.keys.shape[2] <= 3 for _, p in parts)
    assert [first for first, _ in parts] == list(range(0, len(ids), 3))
    torch.testing.assert_close(torch.cat([p.keys for _, p in parts], dim=2), kv.keys)


def test_no_forward_changes_the_replica(case):
    """DESIGN.md invariant 1: digest, mirror and every live row identical after each read-only
    call; the forwards wrote their new tokens into the free slots after the rows (in place,
    no copy of the cache)."""
    lm, ids = case
    state = replica_of(lm, ids)
    before = snapshot_of(state, live=True)
    end = state.position_offset + state.row_count
    free = state.values[:, :, end:].clone()
    rows = rows_of(state)
    forward.step(lm, rows, ids[3])
    assert not torch.equal(state.values[:, :, end:], free)  # written in place
    calls.compute_kv(lm, rows, [(4, ids[1]), (len(ids), ids[1])])
    list(calls.prefill(lm, rows.prefix(5), ids[5:], 2))
    repair_pairs(LMRepairer(lm), rows, [PairRef(5, (ids[5], ids[6]))], 5)
    assert same(snapshot_of(state, live=True), before)


def test_bfloat16_model_keeps_its_dtype_end_to_end():
    """A bf16 model: geometry, replica and returned K/V are bf16; Step still tracks the
    monolithic forward (bf16 tolerance)."""
    from positronic import codec

    lm = tiny_llama(dtype=torch.bfloat16)
    assert lm.geometry.dtype == torch.bfloat16
    ids = [1, 5, 9, 14, 20, 7, 30, 11]
    state = replica_of(lm, ids[:-1])
    out = forward.step(lm, rows_of(state), ids[-1])
    assert out.kv.keys.dtype == torch.bfloat16 and out.logits.dtype == torch.float32
    full = full_forward(lm, ids)
    torch.testing.assert_close(out.logits, full.logits[0, -1].float(), atol=5e-2, rtol=0)
    wire = codec.encode(out.kv.keys)
    assert torch.equal(codec.decode(wire), out.kv.keys)


def test_a_step_after_the_head_moved_equals_a_forward_at_the_rows_positions(case):
    """An eviction near the start moves the rows before it one slot up (position_offset 1):
    the worker must compute the input token at offset + row count, so that Step's logits and
    K/V equal a from-scratch forward of the same tokens at those positions."""
    lm, ids = case
    tokens, extra, token = ids[:10], ids[11], ids[10]  # `extra` is evicted again

    def forward_at(seq: list[int], first: int):
        with torch.inference_mode():
            return lm.model(
                input_ids=torch.tensor([seq]),
                position_ids=torch.arange(first, first + len(seq))[None],
                use_cache=True,
            )

    # What the authority would hold: tokens[0] computed alone (its K/V do not depend on its
    # position beyond the key's rotation), `extra` at row 1, and the rest as a from-scratch
    # forward of `tokens` starting at position 1 places them (origin = row index 2, 3, ...).
    k0, v0 = kv_of(forward_at(tokens[:1], 0))
    kx, vx = kv_of(forward_at([extra], 1))
    kr, vr = kv_of(forward_at(tokens, 1))
    state = new_state(lm)
    commit(state, [AppendOp(0, (tokens[0], extra, *tokens[1:]),
                            torch.cat([k0, kx, kr[:, :, 1:]], dim=2),
                            torch.cat([v0, vx, vr[:, :, 1:]], dim=2))])  # fmt: skip
    commit(state, [EvictOp(1, extra)])
    assert state.position_offset == 1 and state.live_token_ids() == tokens
    out = forward.step(lm, rows_of(state), token)
    full = forward_at([*tokens, token], 1)
    assert out.position == 1 + len(tokens)
    torch.testing.assert_close(out.logits, full.logits[0, -1], atol=TOL, rtol=0)
    keys, values = kv_of(full)
    torch.testing.assert_close(out.kv.keys, keys[:, :, -1:], atol=TOL, rtol=0)
    torch.testing.assert_close(out.kv.values, values[:, :, -1:], atol=TOL, rtol=0)
