"""Policies as pure functions: score updates and plans against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from positronic.loop_view import View, apply_edits
from positronic.policies import make_policy


def structural(n: int, first: bool = True) -> torch.Tensor:
    s = torch.zeros(n, dtype=torch.bool)
    s[0] = first
    return s


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lru")


def test_recent_window_must_protect_the_new_token():
    with pytest.raises(ValueError):
        make_policy("tova", recent_window=0)


def test_halo_update_and_plan():
    halo = make_policy("halo-user", recent_window=2)
    scores = torch.tensor([255.0, 100.0, 50.0, 60.0, 255.0])
    attention = torch.tensor([0.5, 0.0, 0.1, 0.0, 0.2, 0.2])  # 5 rows + itself
    new, seed = halo.update(scores, attention)
    assert new.tolist() == pytest.approx([255.0, 98.0, 49.0, 58.0, 255.0])
    assert seed == 255.0
    all_scores = torch.cat([new, torch.tensor([seed])])
    # Pairs (1,2)=98 (2,3)=58 ; (0,1) structural, (3,4),(4,5) touch the recent window.
    plan = halo.plan(all_scores, structural(6), excess=1)
    assert plan.merges == [2] and plan.evictions == []
    assert halo.merged_score(all_scores, 2) == pytest.approx(58.0)  # the pair's higher
    assert halo.plan(all_scores, structural(6), excess=0).merges == []


def test_halo_falls_back_to_eviction_when_no_pair_fits():
    halo = make_policy("halo", recent_window=1, sinks=0)
    scores = torch.tensor([1.0, 5.0, 3.0, 9.0])  # rows 0 and 2 structural; row 3 recent
    flags = torch.tensor([True, False, True, False])
    plan = halo.plan(scores, flags, excess=1)
    assert plan.merges == [] and plan.evictions == [1]


def test_streaming_evicts_oldest_after_the_sinks():
    policy = make_policy("streaming", sinks=2, recent_window=2)
    scores = torch.zeros(8)
    plan = policy.plan(scores, structural(8), excess=2)
    assert plan.evictions == [2, 3] and plan.merges == []
    assert not policy.keeps_scores


def test_h2o_accumulates_attention():
    policy = make_policy("h2o", recent_window=2, recent_fraction=0.0)
    scores = torch.tensor([0.0, 0.3, 0.1, 0.5])
    new, own = policy.update(scores, torch.tensor([0.4, 0.1, 0.05, 0.05, 0.4]))
    assert new.tolist() == pytest.approx([0.4, 0.4, 0.15, 0.55])
    assert own == pytest.approx(0.4)
    plan = policy.plan(torch.cat([new, torch.tensor([own])]), structural(5), excess=1)
    assert plan.evictions == [2]  # lowest accumulated among rows 1, 2 (3, 4 recent; 0 BOS)


def test_h2o_splits_the_budget_between_heavy_hitters_and_recent_rows():
    """The paper's split: the recent window is half the budget, whatever the budget."""
    policy = make_policy("h2o")
    for budget in (8, 12):
        scores = torch.zeros(budget + 1)  # budget rows + the new one: excess 1
        scores[1:] = torch.linspace(10.0, 0.0, budget)  # the newest rows are the lightest
        plan = policy.plan(scores, structural(budget + 1), excess=1)
        # Rows [budget + 1 - budget/2, budget] are the recent half: the lightest outside it.
        assert plan.evictions == [budget - budget // 2]
    assert make_policy("h2o", recent_fraction=0.0, recent_window=3).window(64) == 3
    with pytest.raises(ValueError):
        make_policy("h2o", recent_fraction=1.0)


def test_tova_uses_only_the_newest_attention():
    policy = make_policy("tova")
    new, own = policy.update(torch.tensor([9.0, 9.0, 9.0]), torch.tensor([0.5, 0.1, 0.3, 0.1]))
    assert new.tolist() == pytest.approx([0.5, 0.1, 0.3]) and own == pytest.approx(0.1)
    plan = policy.plan(torch.cat([new, torch.tensor([own])]), structural(4), excess=1)
    assert plan.evictions == [1]  # the new row (3) is never evicted: it is not cached yet


def test_full_never_compacts():
    policy = make_policy("full")
    assert policy.plan(torch.zeros(5), structural(5), excess=3).evictions == []


def test_view_edits_match_the_patch_semantics():
    view = View(4, b"d4", [1, 10, 11, 12, 13, 14], [True] + [False] * 5, torch.arange(6.0))
    out = apply_edits(
        view,
        scores=torch.arange(6.0) + 1,
        merges=[(1, 99, 7.0)],
        evictions=[4],
        appended=(20, 255.0),
        version=5,
        digest=b"d5",
    )
    # Positions name pre-patch rows: merge (1, 2) -> 99, evict row 4 (token 13), append 20.
    assert out.token_ids == [1, 99, 12, 14, 20]
    assert out.structural == [True, False, False, False, False]
    assert out.scores.tolist() == [1.0, 7.0, 4.0, 6.0, 255.0]
    assert out.version == 5


def test_halo_presets_and_their_repair():
    from positronic.policies import POLICIES, RepairSpec

    kv = make_policy("halo")  # the default is the search's best merge the services can run
    assert kv.merges and kv.sinks == 0 and kv.params.gain == 30.0  # type: ignore[attr-defined]
    assert kv.repair == RepairSpec("kv_merge", kv_weights="attention", kv_key="heavier")
    same = make_policy("halo-kv")
    assert same.parameters() == kv.parameters() and same.repair == kv.repair
    old = make_policy("halo-lm")  # the previous default: age, 4 sinks, the worker's repairer
    assert old.params.gain == 0.0 and old.sinks == 4  # type: ignore[attr-defined]
    assert old.repair == RepairSpec()
    assert make_policy("halo-kv-age").repair.kv_key == "mean"  # type: ignore[union-attr]
    assert make_policy("halo-user").repair.repairer == "default"  # type: ignore[union-attr]
    evict = make_policy("halo-evict")
    assert not evict.merges and evict.repair is None
    for name in POLICIES:  # ListPolicies can describe every preset
        p = make_policy(name)
        assert p.description and all(isinstance(v, float) for v in p.parameters().values())
    with pytest.raises(ValueError):
        RepairSpec("magic")
    with pytest.raises(ValueError):
        RepairSpec("kv_merge", kv_key="lighter")


def test_halo_evict_drops_the_dimmer_row_of_the_pair_halo_kv_would_merge():
    kv, evict = make_policy("halo-kv", recent_window=2), make_policy("halo-evict", recent_window=2)
    scores = torch.tensor([255.0, 90.0, 40.0, 60.0, 200.0, 255.0])
    assert kv.plan(scores, structural(6), excess=1).merges == [2]  # (2, 3): max 60, the lowest
    plan = evict.plan(scores, structural(6), excess=1)
    assert plan.evictions == [2] and plan.merges == []  # row 2 (40) is the pair's dimmer


def test_halo_redundant_scores_rows_by_the_ticks_similarity_and_merges_the_most_alike():
    policy = make_policy("halo-redundant", recent_window=2, sinks=1)
    assert policy.reads_similarity and policy.repair is not None
    assert (policy.repair.repairer, policy.repair.kv_weights) == ("kv_merge", "equal")
    old = torch.full((6,), 0.0)
    with pytest.raises(ValueError, match="similarity"):
        policy.update(old, torch.full((7,), 1 / 7))  # the loop must ask the Tick for it
    similarity = torch.tensor([0.9, 0.1, 0.5, -0.2, 0.95, 0.99])  # row i ~ row i + 1
    scores, own = policy.update(old, torch.full((7,), 1 / 7), similarity)
    assert own == 0.0 and torch.allclose(scores, 1 + similarity)  # brightness is never < 0
    committed = torch.cat([scores, torch.tensor([own])])
    # Row 0 is BOS and a sink, the last two rows the recent window: pair (0, 1) is out, and so
    # are (4, 5) and (5, 6) however alike; of the rest (2, 3) is the most alike.
    assert policy.plan(committed, structural(7), 1).merges == [2]
    plan = policy.plan(committed, structural(7), 2)  # no second disjoint pair: the oldest goes
    assert (plan.merges, plan.evictions) == ([2], [1])
    assert policy.merged_score(committed, 2) == 0.0  # unknown until the next Tick


def test_halo_balanced_merges_single_tokens_then_evicts_the_oldest():
    policy = make_policy("halo-balanced", recent_window=2, sinks=1)
    scores, own = policy.update(torch.tensor([1.0, 2.0, 1.0, 1.0, 2.0]), torch.full((6,), 0.2))
    assert own == 1.0 and scores.tolist() == [1.0, 2.0, 1.0, 1.0, 2.0]  # tokens represented
    committed = torch.cat([scores, torch.tensor([own])])
    plan = policy.plan(committed, structural(6), 1)
    assert plan.merges == [2] and plan.evictions == []  # rows 2, 3 stand for 1 token each
    assert policy.merged_score(committed, 2) == 2.0
    full = torch.tensor([1.0, 2.0, 2.0, 2.0, 1.0, 1.0])  # nothing fits under the cap of 2
    plan = policy.plan(full, structural(6), 1)
    assert plan.merges == [] and plan.evictions == [1]  # the oldest unprotected row
