"""Tick: the step and the repairs of one iteration in one call, equal to the separate calls and to
from-scratch forwards; one forward on a plain or K/V-merge tick, two on an `lm` merge."""

from __future__ import annotations

import pytest
import torch
from worker_fixtures import (
    append_op,
    commit,
    full_forward,
    kv_of,
    replica_of,
    rows_of,
    same,
    snapshot_of,
    stories,
    story_ids,
    tiny_llama,
    tiny_masked_lm,
)

from cache_authority.ops import AppendOp, EvictOp, ReplacePairOp
from model_worker import calls
from model_worker.calls import StepParams
from model_worker.errors import WorkerError
from model_worker.lm_repair import LMRepairer
from model_worker.mlm_repair import MLMRepairer, load_masked_lm
from model_worker.repair import PairRef, repair_pairs
from model_worker.tick import KV_MERGE, LM, MLM, RepairChoice, Repairers, TickParams, tick
from positronic.rope import rerotate_from_canonical

TOL = 1e-4


@pytest.fixture(scope="module")
def story(stories260k_dir):
    lm = stories(str(stories260k_dir))
    ids = story_ids(lm)
    return lm, ids, replica_of(lm, ids[:-1])


def _params(token, merges=(), repair=None, forced=None):
    step = StepParams(input_token_id=token, forced_next_token_id=forced)
    return TickParams(step, tuple(merges), repair or RepairChoice())


def _pair(ids, p, weights=()):
    return PairRef(p, (ids[p], ids[p + 1]), weights)


def test_a_plain_tick_is_a_step_with_the_token_text(story):
    lm, ids, state = story
    rows = rows_of(state)
    result = tick(lm, rows, _params(ids[-1]), Repairers(LMRepairer(lm)))
    step = calls.step(lm, rows, StepParams(input_token_id=ids[-1]))
    assert result.forwards == 1 and result.merges == []
    assert result.step.next_token_id == step.next_token_id
    torch.testing.assert_close(result.step.output.logits, step.output.logits, atol=TOL, rtol=0)
    torch.testing.assert_close(result.step.output.attention, step.output.attention)
    torch.testing.assert_close(result.step.output.kv.keys, step.output.kv.keys)
    assert result.step.output.position == len(ids) - 1
    nxt = result.step.next_token_id
    assert result.next_piece == lm.table.pieces[nxt]
    assert result.next_bytes == lm.table.text_bytes[nxt]


def test_an_lm_merge_takes_two_forwards_and_matches_repair_and_compute_kv(story):
    """The replacement is the Repair RPC's best candidate for the pair, its K/V those of a
    from-scratch forward of rows < p and the replacement at p; the step is unchanged."""
    lm, ids, state = story
    rows = rows_of(state)
    before = snapshot_of(state, live=True)
    pairs = [_pair(ids, 3), _pair(ids, 8)]
    repairers = Repairers(LMRepairer(lm))
    result = tick(lm, rows, _params(ids[-1], pairs, RepairChoice(LM, 5)), repairers)
    plain = tick(lm, rows, _params(ids[-1]), repairers)
    assert result.forwards == 2
    assert result.step.next_token_id == plain.step.next_token_id
    torch.testing.assert_close(
        result.step.output.logits, plain.step.output.logits, atol=TOL, rtol=0
    )
    torch.testing.assert_close(
        result.step.output.attention, plain.step.output.attention, atol=1e-6, rtol=0
    )
    ranked = repair_pairs(repairers.lm, rows, pairs, 5)
    for pair, merge, cands in zip(pairs, result.merges, ranked, strict=True):
        p = pair.position
        assert merge.merged and merge.position == p
        assert merge.token_id == cands[0].token_id
        assert merge.score == pytest.approx(cands[0].score, abs=1e-3)
        assert merge.piece == lm.table.pieces[merge.token_id]
        assert merge.replaced_text == lm.table.text_of(ids[p : p + 2])
        keys, values = kv_of(full_forward(lm, [*ids[:p], merge.token_id]))
        torch.testing.assert_close(merge.kv.keys, keys[:, :, -1:], atol=TOL, rtol=0)
        torch.testing.assert_close(merge.kv.values, values[:, :, -1:], atol=TOL, rtol=0)
    assert same(snapshot_of(state, live=True), before)


def test_the_pairs_own_tokens_are_always_candidates(story):
    lm, ids, state = story
    p = 8
    cands = LMRepairer(lm).candidates(rows_of(state), p, 100)
    assert {ids[p], ids[p + 1]} <= {c.token_id for c in cands}


@pytest.mark.parametrize("first", [1, 2])
def test_a_tick_draws_the_repair_rpcs_pool_whatever_max_candidates(story, first):
    """With max_candidates 1 the Tick's winner is still the Repair RPC's best of the same
    pool (the `pool` most likely tokens, not the top max_candidates: the follower term often
    promotes a token the prior ranks lower), for every pair of the story."""
    lm, ids, state = story
    rows = rows_of(state)
    pairs = [_pair(ids, p) for p in range(first, rows.count - 2, 2)]
    repairers = Repairers(LMRepairer(lm))
    result = tick(lm, rows, _params(ids[-1], pairs, RepairChoice(LM, 1)), repairers)
    ranked = repair_pairs(repairers.lm, rows, pairs, 1)
    assert [m.token_id for m in result.merges] == [c[0].token_id for c in ranked]
    for merge, cands in zip(result.merges, ranked, strict=True):
        assert merge.score == pytest.approx(cands[0].score, abs=1e-3)


def test_a_pair_ending_at_the_last_row_is_followed_by_the_input_token(story):
    lm, ids, state = story
    n = state.row_count
    p = n - 2
    result = tick(lm, rows_of(state), _params(ids[-1], [_pair(ids, p)]), Repairers(LMRepairer(lm)))
    (merge,) = result.merges
    left = full_forward(lm, ids[:p]).logits[0, -1].float().log_softmax(-1)
    then = full_forward(lm, [*ids[:p], merge.token_id]).logits[0, -1].float().log_softmax(-1)
    want = left[merge.token_id] + then[ids[-1]]  # ids[-1] is the input token, at row n
    assert merge.score == pytest.approx(float(want), abs=1e-3)


def test_a_kv_merge_needs_no_forward(story):
    """value = weighted mean, key = weighted mean of both canonical keys rotated to the merged
    row's position (or the heavier one's), on rows whose head moved (position_offset 1)."""
    lm, ids, _ = story
    state = replica_of(lm, ids[:12])
    commit(state, [EvictOp(1, ids[1])])  # the head moves up: offset 1
    assert state.position_offset == 1
    rows = rows_of(state)
    live = state.live_token_ids()
    p = 4
    repairers = Repairers(LMRepairer(lm))
    plain = tick(lm, rows, _params(ids[12]), repairers)
    att = plain.step.output.attention
    for weights, key, explicit in (
        ("attention", "mean", ()),
        ("equal", "heavier", ()),
        ("attention", "heavier", (1.0, 3.0)),
    ):
        choice = RepairChoice(KV_MERGE, kv_weights=weights, kv_key=key)
        pair = PairRef(p, (live[p], live[p + 1]), explicit)
        result = tick(lm, rows, _params(ids[12], [pair], choice), repairers)
        assert result.forwards == 1
        if explicit:
            w = torch.tensor(explicit) / sum(explicit)
        elif weights == "equal":
            w = torch.tensor([0.5, 0.5])
        else:
            w = att[p : p + 2] / att[p : p + 2].sum()
        at = torch.full((2,), state.position_offset + p)
        k = rerotate_from_canonical(
            state.live_canonical_keys()[:, :, p : p + 2],
            state.live_origin_positions()[p : p + 2],
            at,
            lm.geometry.rope,
        )
        v = state.live_values()[:, :, p : p + 2]
        heavier = 0 if w[0] >= w[1] else 1
        want_k = (
            w[0] * k[:, :, :1] + w[1] * k[:, :, 1:]
            if key == "mean"
            else k[:, :, heavier : heavier + 1]
        )
        (merge,) = result.merges
        torch.testing.assert_close(merge.kv.values, w[0] * v[:, :, :1] + w[1] * v[:, :, 1:])
        torch.testing.assert_close(merge.kv.keys, want_k)
        assert merge.token_id == live[p + heavier] and merge.merged
        assert merge.score == pytest.approx(float(w.max()))


def test_a_kv_merged_row_behaves_as_a_row_at_its_position(story):
    """Equal weights of two copies of the same row are that row: after the merge, its key is
    the row's canonical key rotated to the merged position."""
    lm, ids, _ = story
    state = replica_of(lm, ids[:10])
    rows = rows_of(state)
    p = 5
    same_row = PairRef(p, (ids[p], ids[p + 1]), (1.0, 0.0))
    result = tick(
        lm, rows, _params(ids[10], [same_row], RepairChoice(KV_MERGE)), Repairers(LMRepairer(lm))
    )
    (merge,) = result.merges
    torch.testing.assert_close(merge.kv.keys, state.live_canonical_keys()[:, :, p : p + 1])
    torch.testing.assert_close(merge.kv.values, state.live_values()[:, :, p : p + 1])
    assert merge.token_id == ids[p]


def test_an_mlm_merge_computes_its_replacement_in_the_step_pass(story, tmp_path):
    lm, ids, state = story
    masked = load_masked_lm(str(tiny_masked_lm(tmp_path)), device="cpu")
    mlm = MLMRepairer(lm, masked, pool=1000)
    rows = rows_of(state)
    p = 9
    result = tick(
        lm,
        rows,
        _params(ids[-1], [_pair(ids, p)], RepairChoice(MLM)),
        Repairers(LMRepairer(lm), mlm, MLM),
    )
    assert result.forwards == 1
    (merge,) = result.merges
    (cands,) = repair_pairs(mlm, rows, [_pair(ids, p)], 5)
    assert merge.merged and merge.token_id == cands[0].token_id
    keys, values = kv_of(full_forward(lm, [*ids[:p], merge.token_id]))
    torch.testing.assert_close(merge.kv.keys, keys[:, :, -1:], atol=TOL, rtol=0)
    torch.testing.assert_close(merge.kv.values, values[:, :, -1:], atol=TOL, rtol=0)


def test_a_pair_at_row_zero_has_no_lm_replacement():
    lm = tiny_llama()
    ids = [1, 5, 9, 14, 20, 7, 30, 11]
    state = replica_of(lm, ids[:-1])
    result = tick(lm, rows_of(state), _params(ids[-1], [_pair(ids, 0)]), Repairers(LMRepairer(lm)))
    (merge,) = result.merges
    assert not merge.merged and merge.kv is None and merge.replaced_text
    assert result.forwards == 1


@pytest.mark.parametrize(
    ("pairs", "repair", "code"),
    [
        (
            [PairRef(2, (9, 14)), PairRef(3, (14, 20))],
            RepairChoice(),
            "INVALID_ARGUMENT",
        ),  # overlap
        ([PairRef(6, (30, 11))], RepairChoice(), "INVALID_ARGUMENT"),  # touches the new row
        ([PairRef(-1, (0, 0))], RepairChoice(), "INVALID_ARGUMENT"),
        ([PairRef(2, (9,))], RepairChoice(), "INVALID_ARGUMENT"),
        ([PairRef(2, (9, 15))], RepairChoice(), "FAILED_PRECONDITION"),  # other tokens there
        ([PairRef(2, (9, 14), (1.0, 1.0))], RepairChoice(LM), "INVALID_ARGUMENT"),  # lm weights
        ([PairRef(2, (9, 14), (0.0, 0.0))], RepairChoice(KV_MERGE), "INVALID_ARGUMENT"),
        ([PairRef(2, (9, 14), (float("nan"), 1.0))], RepairChoice(KV_MERGE), "INVALID_ARGUMENT"),
        ([PairRef(2, (9, 14), (1.0,))], RepairChoice(KV_MERGE), "INVALID_ARGUMENT"),
        ([PairRef(2, (9, 14))], RepairChoice(MLM), "FAILED_PRECONDITION"),  # no masked LM here
        ([PairRef(2, (9, 14))], RepairChoice(LM, 101), "RESOURCE_EXHAUSTED"),
        ([PairRef(2 * i, (0, 0)) for i in range(257)], RepairChoice(), "RESOURCE_EXHAUSTED"),
        # lm scores each pair's own 2 tokens and a pool of max(32, candidates): 86 x 102 tokens
        # are over the 8,704 a call may score
        ([PairRef(2 * i, (0, 0)) for i in range(86)], RepairChoice(LM, 100), "RESOURCE_EXHAUSTED"),
    ],
)
def test_refused_ticks_compute_nothing(pairs, repair, code):
    lm = tiny_llama()
    ids = [1, 5, 9, 14, 20, 7, 30, 11]
    state = replica_of(lm, ids[:-1])
    before = snapshot_of(state)
    with pytest.raises(WorkerError) as e:
        tick(lm, rows_of(state), _params(ids[-1], pairs, repair), Repairers(LMRepairer(lm)))
    assert e.value.code == code
    assert same(snapshot_of(state), before)  # not even the free slots were written


def test_a_tick_on_a_full_replica_writes_into_the_scratch_slots():
    """Rows that end at the buffers' last slot: the new tokens go to the scratch slots past
    them (never a live row), and the results equal a private copy's."""
    lm = tiny_llama()
    ids = [1, 5, 9, 14, 20, 7, 30, 11, 12, 13]
    state = replica_of(lm, ids[:8], hard_max=8)  # 16 slots
    while state.position_offset + state.row_count < state.capacity:  # evict near the head
        live = state.live_token_ids()
        commit(state, [EvictOp(1, live[1]), append_op(lm, [live[1]], 8)])
    rows = rows_of(state)
    live = state.live_token_ids()
    before = snapshot_of(state, live=True)
    pairs = [PairRef(2, (live[2], live[3]))]
    result = tick(lm, rows, _params(ids[9], pairs), Repairers(LMRepairer(lm)))
    private = tick(lm, rows.prefix(8), _params(ids[9], pairs), Repairers(LMRepairer(lm)))
    assert same(snapshot_of(state, live=True), before)
    assert not torch.equal(
        state.values[:, :, state.capacity :], torch.zeros_like(state.values[:, :, state.capacity :])
    )
    torch.testing.assert_close(result.step.output.kv.keys, private.step.output.kv.keys)
    torch.testing.assert_close(result.merges[0].kv.keys, private.merges[0].kv.keys)


def test_forced_next_token_and_its_text():
    lm = tiny_llama()
    ids = [1, 5, 9, 14, 20]
    state = replica_of(lm, ids[:-1])
    result = tick(lm, rows_of(state), _params(ids[-1], forced=2), Repairers(LMRepairer(lm)))
    assert result.step.next_token_id == 2
    assert result.next_piece == "</s>" and result.next_bytes == b""  # special: no text
    full = full_forward(lm, ids).logits[0, -1].float().log_softmax(-1)
    assert result.step.next_token_logprob == pytest.approx(float(full[2]), abs=TOL)


def test_append_what_a_tick_returns_and_go_on(story):
    """A Tick's replacement and input K/V committed as the loop's Patch does: the replica
    takes them (both at the positions they were computed for) and the next Tick runs at the
    new row count."""
    lm, ids, _ = story
    state = replica_of(lm, ids[:12])
    result = tick(lm, rows_of(state), _params(ids[12], [_pair(ids, 5)]), Repairers(LMRepairer(lm)))
    (merge,) = result.merges
    out = result.step.output
    replace = ReplacePairOp(
        5, (ids[5], ids[6]), merge.token_id, merge.kv.keys, merge.kv.values, merge.piece, 1.0
    )
    commit(state, [replace, AppendOp(12, (ids[12],), out.kv.keys, out.kv.values)])
    assert state.live_token_ids() == [*ids[:5], merge.token_id, *ids[7:13]]
    torch.testing.assert_close(state.live_canonical_keys()[:, :, 5:6], merge.kv.keys)
    again = tick(lm, rows_of(state), _params(ids[13]), Repairers(LMRepairer(lm)))
    assert again.step.output.position == state.position_offset + state.row_count
    assert torch.isfinite(again.step.output.logits).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_replicas_tick_in_their_dtype(dtype):
    """The accelerator path on CPU: a replica in the model's half dtype, read in place by a
    plain, an lm and a K/V-merge Tick; every K/V out is in that dtype, the live rows are
    untouched, and the step equals the separate Step call."""
    lm = tiny_llama(dtype=dtype)
    ids = [1, 5, 9, 14, 20, 7, 30, 11, 12, 13]
    state = replica_of(lm, ids[:9])
    assert state.values.dtype == dtype and state.rotated_keys is not None
    assert state.rotated_keys.dtype == dtype and state.canonical_keys.dtype == dtype
    rows = rows_of(state)
    live = state.live_token_ids()
    before = snapshot_of(state, live=True)
    repairers = Repairers(LMRepairer(lm))
    plain = tick(lm, rows, _params(ids[9]), repairers)
    step = calls.step(lm, rows, StepParams(input_token_id=ids[9]))
    assert plain.forwards == 1 and plain.step.next_token_id == step.next_token_id
    assert plain.step.output.kv.keys.dtype == dtype
    pair = PairRef(3, (live[3], live[4]))
    for choice, forwards in ((RepairChoice(LM), 2), (RepairChoice(KV_MERGE), 1)):
        result = tick(lm, rows, _params(ids[9], [pair], choice), repairers)
        assert result.forwards == forwards
        assert result.step.next_token_id == plain.step.next_token_id
        (merge,) = result.merges
        assert merge.merged and merge.kv.keys.dtype == dtype and merge.kv.values.dtype == dtype
        assert torch.isfinite(merge.kv.keys.float()).all()
    assert same(snapshot_of(state, live=True), before)


def test_the_repair_work_limit_counts_the_pool_and_the_pair():
    from model_worker.limits import MAX_PAIRS, MAX_SCORED_CANDIDATES, check_repair_work

    check_repair_work(MAX_PAIRS, 5)  # every pair the loop may ask for, at the default pool
    check_repair_work(MAX_PAIRS, 32)
    check_repair_work(MAX_SCORED_CANDIDATES // 102, 100)  # 85
    for pairs, k in ((MAX_PAIRS, 33), (MAX_SCORED_CANDIDATES // 102 + 1, 100)):
        with pytest.raises(WorkerError) as e:
            check_repair_work(pairs, k)
        assert e.value.code == "RESOURCE_EXHAUSTED" and "fewer pairs" in str(e.value)
