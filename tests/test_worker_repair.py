"""Repairers: `lm` scores match from-scratch forwards; `mlm` keeps single-token words only."""

from __future__ import annotations

import pytest
import torch
from worker_fixtures import full_forward, replica_of, rows_of, stories, story_ids, tiny_masked_lm

from model_worker.errors import WorkerError
from model_worker.lm_repair import LMRepairer
from model_worker.mlm_repair import MLMRepairer, load_masked_lm
from model_worker.repair import PairRef, banned_ids, build_repairer, repair_pairs
from positronic.special_tokens import encode_text


@pytest.fixture(scope="module")
def story(stories260k_dir):
    lm = stories(str(stories260k_dir))
    ids = story_ids(lm)
    return lm, ids, rows_of(replica_of(lm, ids))


def _logprobs(lm, ids):
    return full_forward(lm, ids).logits[0, -1].float().log_softmax(-1)


def test_lm_candidates_are_scored_by_the_merged_continuation(story):
    lm, ids, rows = story
    p = 8
    (cands,) = repair_pairs(LMRepairer(lm), rows, [PairRef(p, (ids[p], ids[p + 1]))], 6)
    assert len(cands) == 6
    assert [c.score for c in cands] == sorted((c.score for c in cands), reverse=True)
    assert not {c.token_id for c in cands} & banned_ids(lm)
    for c in cands[:3]:  # log p(x | rows < p) + log p(token after the pair | rows < p, x)
        want = (
            _logprobs(lm, ids[:p])[c.token_id] + _logprobs(lm, [*ids[:p], c.token_id])[ids[p + 2]]
        )
        assert c.score == pytest.approx(float(want), abs=1e-4)
        assert c.piece == lm.tokenizer.convert_ids_to_tokens(c.token_id)  # the vocabulary piece


def test_lm_pair_at_the_end_and_at_the_start(story):
    lm, ids, rows = story
    p = len(ids) - 2
    (cands,) = repair_pairs(LMRepairer(lm), rows, [PairRef(p, (ids[p], ids[p + 1]))], 3)
    prior = _logprobs(lm, ids[:p])
    assert cands[0].score == pytest.approx(float(prior[cands[0].token_id]), abs=1e-4)
    assert repair_pairs(LMRepairer(lm), rows, [PairRef(0, (ids[0], ids[1]))], 3) == [[]]


def test_pairs_are_checked_before_anything_runs(story):
    lm, ids, rows = story
    repairer = build_repairer("lm", lm)
    with pytest.raises(WorkerError) as e:
        repair_pairs(repairer, rows, [PairRef(3, (ids[3], ids[3] + 1))], 3)
    assert e.value.code == "FAILED_PRECONDITION"
    for bad in (PairRef(len(ids) - 1, (ids[-1], 0)), PairRef(-1, (0, 0)), PairRef(3, (ids[3],))):
        with pytest.raises(WorkerError) as e:
            repair_pairs(repairer, rows, [bad], 3)
        assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(WorkerError):
        repair_pairs(repairer, rows, [PairRef(3, (ids[3], ids[4]))], -1)


@pytest.fixture(scope="module")
def mlm_repairer(story, tmp_path_factory):
    lm = story[0]
    masked = load_masked_lm(str(tiny_masked_lm(tmp_path_factory.mktemp("mlm"))), device="cpu")
    return MLMRepairer(lm, masked, pool=1000)


def test_mlm_masks_the_first_token_and_omits_the_second(story, mlm_repairer):
    rows = story[2]
    p = 5  # (",", " there") after BOS: "Once upon a time" [MASK] " was a little ..."
    left, lead, right = mlm_repairer.masked_text(rows, p)
    assert left == "Once upon a time"
    assert lead == ""  # "," carries no space
    assert right.startswith(" was a little girl")


def test_mlm_returns_only_single_token_candidates(story, mlm_repairer):
    lm, ids, rows = story
    p = 9  # (" little", " girl")
    left, lead, right = mlm_repairer.masked_text(rows, p)
    words = [
        mlm_repairer.mlm.tokenizer.decode([i]).strip()
        for i, _ in mlm_repairer.predictions(left, lead, right)
    ]
    left_ids = encode_text(lm.tokenizer, left)
    lengths = {w: len(encode_text(lm.tokenizer, left + lead + w)) - len(left_ids) for w in words}
    assert any(n > 1 for n in lengths.values()), "the test needs multi-token predictions"
    (cands,) = repair_pairs(mlm_repairer, rows, [PairRef(p, (ids[p], ids[p + 1]))], 100)
    assert cands, "some single-token word should survive"
    assert len({c.token_id for c in cands}) == len(cands)
    assert not {c.token_id for c in cands} & banned_ids(lm)
    words_of = {c.token_id: lm.table.text_of([c.token_id]).strip() for c in cands}
    for c in cands:
        assert c.piece == lm.table.pieces[c.token_id]
        assert encode_text(lm.encoder, left + lead + words_of[c.token_id]) == [
            *left_ids,
            c.token_id,
        ]
    multi = {w for w, n in lengths.items() if n > 1}
    assert not set(words_of.values()) & multi
    assert [c.score for c in cands] == sorted((c.score for c in cands), reverse=True)


def test_mlm_text_that_spells_special_tokens_stays_text(story, mlm_repairer):
    """A story that writes "[MASK]" or "[SEP]" gives the masked LM those characters, never a
    second mask or a separator: the one mask is placed by id."""
    lm = story[0]
    ids = [1, *encode_text(lm.encoder, "once upon [MASK] a time [SEP] there was a dog")]
    rows = rows_of(replica_of(lm, ids))
    p = ids.index(encode_text(lm.encoder, "once upon [MASK] a time")[-1])  # " time"
    left, lead, right = mlm_repairer.masked_text(rows, p)
    assert left == "once upon [MASK] a" and lead == " "
    assert right.endswith("[SEP] there was a dog")
    tok = mlm_repairer.mlm.tokenizer
    seen, mask_at = mlm_repairer.masked_ids(left, right)
    assert seen.count(tok.mask_token_id) == 1 and seen[mask_at] == tok.mask_token_id
    assert seen.count(tok.sep_token_id) == 1 and seen[-1] == tok.sep_token_id
    assert seen.count(tok.cls_token_id) == 1 and seen[0] == tok.cls_token_id


def test_mlm_needs_a_mask_token(story):
    from worker_fixtures import word_tokenizer

    from model_worker.mlm_repair import MaskedLM

    with pytest.raises(ValueError):
        MaskedLM("no-mask", torch.nn.Linear(1, 1), word_tokenizer())
