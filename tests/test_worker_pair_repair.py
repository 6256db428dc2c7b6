"""The Tick's `pair_lm` repairer and its adjacent similarity, against from-scratch forwards: the
pair's own token that best predicts what followed the pair (K/V nearest the pair's), in one
extra forward for all pairs; and row i's similarity to row i + 1 as KVMerger defines it."""

from __future__ import annotations

import pytest
import torch
from worker_fixtures import full_forward, kv_of, replica_of, rows_of, stories, story_ids

from model_worker.calls import StepParams
from model_worker.lm_repair import LMRepairer
from model_worker.repair import PairRef
from model_worker.similarity import tick_similarity
from model_worker.tick import PAIR_LM, RepairChoice, Repairers, TickParams, tick
from positronic.rope import rotate_keys

TOL = 1e-4


@pytest.fixture(scope="module")
def story(stories260k_dir):
    lm = stories(str(stories260k_dir))
    ids = story_ids(lm)
    return lm, ids, replica_of(lm, ids[:-1])


def _expected_score(lm, ids: list[int], n: int, p: int, x: int) -> float:
    """From scratch: log p(c | ids < p, x) (or −KL to the pair's continuation when the pair
    ends the rows) minus the relative squared distance of x's K/V from the pair's mean."""
    logp = full_forward(lm, [*ids[:p], x]).logits[0, -1].float().log_softmax(-1)
    if p + 2 < n:
        fit = float(logp[ids[p + 2]])
    else:
        target = full_forward(lm, ids[: p + 2]).logits[0, -1].float().log_softmax(-1)
        fit = -float((target.exp() * (target - logp)).sum())
    keys, values = kv_of(full_forward(lm, ids[:n]))
    mine_k, mine_v = kv_of(full_forward(lm, [*ids[:p], x]))
    k_mean = (keys[:, :, p : p + 1] + rotate_keys(keys[:, :, p + 1 : p + 2], torch.tensor([-1]),
              lm.geometry.rope)) / 2  # fmt: skip
    v_mean = (values[:, :, p : p + 1] + values[:, :, p + 1 : p + 2]) / 2
    ref = torch.cat([k_mean, v_mean], dim=-1)
    mine = torch.cat([mine_k[:, :, -1:], mine_v[:, :, -1:]], dim=-1)
    return fit - float(((mine - ref) ** 2).sum() / (ref**2).sum())


def test_a_pair_lm_tick_keeps_the_pair_token_that_best_continues_it(story):
    """Every pair's replacement is one of its own tokens, the argmax of the from-scratch score,
    with the K/V of a from-scratch forward of rows < p and it; all pairs (one ending the rows,
    scored by KL) cost one forward together; the step is the plain Tick's."""
    lm, ids, state = story
    rows = rows_of(state)
    n = rows.count
    pairs = [PairRef(p, (ids[p], ids[p + 1])) for p in (0, 3, 8, n - 2)]
    step = StepParams(input_token_id=ids[-1])
    repairers = Repairers(LMRepairer(lm))
    result = tick(lm, rows, TickParams(step, tuple(pairs), RepairChoice(PAIR_LM)), repairers)
    plain = tick(lm, rows, TickParams(step), repairers)
    assert result.forwards == 2
    assert result.step.next_token_id == plain.step.next_token_id
    torch.testing.assert_close(
        result.step.output.logits, plain.step.output.logits, atol=TOL, rtol=0
    )
    chose_second = False
    for pair, merge in zip(pairs, result.merges, strict=True):
        p = pair.position
        own = list(dict.fromkeys(ids[p : p + 2]))
        scores = [_expected_score(lm, ids, n, p, x) for x in own]
        best = max(range(len(own)), key=lambda i: scores[i])
        assert merge.merged and merge.token_id == own[best], p
        chose_second |= best == 1
        assert merge.score == pytest.approx(scores[best], abs=1e-3)
        keys, values = kv_of(full_forward(lm, [*ids[:p], merge.token_id]))
        torch.testing.assert_close(merge.kv.keys, keys[:, :, -1:], atol=TOL, rtol=0)
        torch.testing.assert_close(merge.kv.values, values[:, :, -1:], atol=TOL, rtol=0)
    assert chose_second  # the choice is made, not always the first token


def test_adjacent_similarity_is_kvmergers_over_the_rows_and_the_input(story):
    """Value i: the mean over layers and heads of (cos of the keys at one position + cos of the
    values) / 2 for rows i and i + 1, the Tick's input token being row n."""
    lm, ids, state = story
    rows = rows_of(state)
    n = rows.count
    result = tick(
        lm, rows, TickParams(StepParams(input_token_id=ids[-1])), Repairers(LMRepairer(lm))
    )
    got = tick_similarity(rows, result.step.output.kv, lm.geometry.rope)
    keys, values = kv_of(full_forward(lm, ids[: n + 1]))
    assert got.shape == (n,)
    for i in (0, 5, n - 1):
        back = rotate_keys(keys[:, :, i + 1 : i + 2], torch.tensor([-1]), lm.geometry.rope)
        cos_k = torch.nn.functional.cosine_similarity(keys[:, :, i], back[:, :, 0], dim=-1)
        cos_v = torch.nn.functional.cosine_similarity(values[:, :, i], values[:, :, i + 1], dim=-1)
        assert float(got[i]) == pytest.approx(float(((cos_k + cos_v) / 2).mean()), abs=1e-5)
    assert bool((got <= 1 + 1e-6).all() and (got >= -1 - 1e-6).all())
