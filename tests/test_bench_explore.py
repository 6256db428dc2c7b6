"""The search's simulator: it must compute what the real loop computes (same NLLs), and its
K/V merges and rotations must be the arithmetic they claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from positronic.bench.explore_cache import BatchCache, RotationTable, StepResult
from positronic.bench.explore_repair import repair_kv
from positronic.bench.explore_run import parse_candidate, simulate
from positronic.rope import Rope, rotate_keys


@pytest.fixture(scope="module")
def lm(stories260k_dir):
    from model_worker.model import load_model

    torch.set_num_threads(1)
    return load_model(str(stories260k_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def stream(stories260k_dir, tinystories_path) -> list[int]:
    from transformers import AutoTokenizer

    from positronic.bench.streams import streams_from_file

    tok = AutoTokenizer.from_pretrained(str(stories260k_dir))
    return streams_from_file(tok, tinystories_path, 1, 48, first_story=3)[0].token_ids


def test_simulator_matches_the_real_loop(lm, stream, stories260k_dir):
    """Per-token NLLs of the simulator equal `bench quality`'s loop through the services (one
    Tick and one Patch per token), for an eviction policy, the lm-repairing halo-lm and the
    attention-driven halo-user (a row that
    moves after an edit, including the input token's new row, is re-rotated as the authority
    does)."""
    from positronic.bench.runner import Job, local_services, run_job
    from positronic.bench.specs import parse_spec

    names = ["streaming", "halo-lm", "halo-user"]
    # The loop plans a merge before its Tick, from the committed scores (one tick behind): the
    # simulator's `lag=1`. An eviction-only policy plans after the step in both.
    candidates = ["streaming", "halo-lm|lag=1", "halo-user|lag=1"]
    budget = 16
    sims = simulate(lm, [(parse_candidate(c), stream) for c in candidates], budget)
    with local_services(str(stories260k_dir), None) as endpoints:
        for name, sim in zip(names, sims, strict=True):
            real = run_job(endpoints, Job(parse_spec(name), 0, stream, budget))
            assert len(sim.nll) == len(real.nll) == len(stream) - 2
            np.testing.assert_allclose(sim.nll, real.nll, atol=1e-4, err_msg=name)
            assert (sim.merges, sim.evictions) == (real.merges, real.evictions)


def test_simulator_matches_the_real_loop_for_the_new_presets(lm, stream, stories260k_dir):
    """The same per-token agreement for the presets that select by redundancy (the Tick's
    adjacent similarity, here with the recent window a budget of 16 allows) or by tokens
    represented, and for the pair-aware repairer (the worker's `pair_lm`, one forward)."""
    from positronic.bench.runner import Job, local_services, run_job
    from positronic.bench.specs import parse_spec

    names = ["halo-pair", "halo-redundant:window=8", "halo-balanced"]
    budget = 16
    jobs = [(parse_candidate(f"{n}|lag=1"), stream) for n in names]
    sims = simulate(lm, jobs, budget)
    assert sims[0].forwards == sims[0].merges > 0  # one forward per merging tick
    with local_services(str(stories260k_dir), None) as endpoints:
        for name, sim in zip(names, sims, strict=True):
            real = run_job(endpoints, Job(parse_spec(name), 0, stream, budget))
            assert len(sim.nll) == len(real.nll) == len(stream) - 2
            np.testing.assert_allclose(sim.nll, real.nll, atol=1e-4, err_msg=name)
            assert (sim.merges, sim.evictions) == (real.merges, real.evictions), name
            assert sim.merges > 0, name


def test_batching_does_not_mix_sessions(lm, stream):
    a, b = parse_candidate("tova"), parse_candidate("halo|repair=kv|weights=attention")
    together = simulate(lm, [(a, stream), (b, stream[::-1])], 16)
    alone = [simulate(lm, [(a, stream)], 16)[0], simulate(lm, [(b, stream[::-1])], 16)[0]]
    for t, s in zip(together, alone, strict=True):
        np.testing.assert_allclose(t.nll, s.nll, atol=1e-5)
        assert (t.merges, t.evictions) == (s.merges, s.evictions)


def test_rotation_table_is_rotate_keys_bit_for_bit():
    rope = Rope.from_theta(8)
    table = RotationTable(rope, 300)
    keys = torch.randn(3, 2, 7, 8)
    offsets = torch.tensor([0, -1, -5, 3, -300, 299, -17])
    assert torch.equal(table.rotate(keys, offsets), rotate_keys(keys, offsets, rope))


def _cache_with_rows(lm, keys: torch.Tensor, values: torch.Tensor) -> BatchCache:
    """One session whose rows hold `keys` (canonical, at their index) and `values` [L,H,S,D]."""
    cache = BatchCache(lm, 1, keys.shape[2], 16)
    for i in range(keys.shape[2]):
        step = StepResult(
            torch.zeros(1), keys[:, :, i : i + 1], values[:, :, i : i + 1], *[None] * 3
        )
        cache.append([10 + i], [step], i)  # type: ignore[list-item]
    return cache


def test_kv_merge_is_a_weighted_mean_at_one_position(lm):
    g = lm.geometry
    torch.manual_seed(1)
    shape = (g.num_layers, g.num_kv_heads, 4, g.head_dim)
    keys, values = torch.randn(shape), torch.randn(shape)
    cache = _cache_with_rows(lm, keys, values)
    attention = torch.tensor([0.1, 0.3, 0.1, 0.2, 0.3])  # rows 1, 2 weigh 3 : 1
    step = StepResult(torch.zeros(1), None, None, None, None, attention)  # type: ignore[arg-type]
    back = rotate_keys(keys[:, :, 2:3], torch.tensor([-1]), g.rope)  # row 2's key at position 1
    r = repair_kv(cache, 0, step, 1, "attention", "mean")
    torch.testing.assert_close(r.values, 0.75 * values[:, :, 1:2] + 0.25 * values[:, :, 2:3])
    torch.testing.assert_close(r.keys, 0.75 * keys[:, :, 1:2] + 0.25 * back)
    assert r.token_id == 11 and r.forwards == 0  # the heavier row's token
    heavier = repair_kv(cache, 0, step, 1, "attention", "heavier")
    torch.testing.assert_close(heavier.keys, keys[:, :, 1:2])
    equal = repair_kv(cache, 0, step, 1, "equal", "mean")
    torch.testing.assert_close(equal.values, (values[:, :, 1:2] + values[:, :, 2:3]) / 2)
    # After merging rows 1, 2 the rows behind move down one and are re-rotated from canonical.
    size = cache.edit(0, {1: (r.token_id, r.keys, r.values)}, [])
    cache.resize([size])
    assert cache.token_ids[0] == [10, 11, 13] and cache.count[0, :3].tolist() == [1, 2, 1]
    moved = rotate_keys(keys[:, :, 3:4], torch.tensor([-1]), g.rope)
    torch.testing.assert_close(cache.keys[:, 0, :, 2:3], moved)


def test_candidates_are_validated():
    assert parse_candidate("halo|repair=kv|weights=count|lag=1").lag
    for bad in ("halo|repair=magic", "halo|weights=loud", "halo|colour=1", "nope", "halo|pool"):
        with pytest.raises(ValueError):
            parse_candidate(bad)


def test_presets_are_what_the_search_measured(lm, stream):
    """`halo` (= `halo-kv`) is the search's winner spelled out; `halo-evict` its eviction twin
    (an eviction-only policy plans after the step, from fresh scores: no lag); `halo-lm` the old
    default (age, 4 sinks, lm)."""
    texts = [
        "halo|lag=1",
        "halo-user:gain=30|repair=kv|weights=attention|key=heavier|lag=1",
        "halo-evict|lag=1",
        "halo-user:gain=30|repair=evict",
        "halo-kv|lag=1",
        "halo-lm",
        "halo-user:gain=0:sinks=4",
    ]
    runs = simulate(lm, [(parse_candidate(t), stream) for t in texts], 16)
    assert runs[0].nll == runs[1].nll == runs[4].nll and runs[0].merges > 0
    assert runs[2].nll == runs[3].nll and runs[2].merges == 0 and runs[2].evictions > 0
    # The lm repairer's batched forward rounds by batch slot: equal to float precision.
    np.testing.assert_allclose(runs[5].nll, runs[6].nll, atol=1e-5)
    assert runs[5].merges == runs[6].merges > 0 and runs[5].forwards > 0


def test_new_presets_are_the_search_configurations(lm, stream):
    """Planned from fresh scores (no lag), each new preset is the search's configuration it
    names: the redundancy and balanced selections of the simulator, the pair-aware lm."""
    pairs = [
        ("halo-redundant:window=8", "halo-lm:window=8|select=redundant|repair=kv|weights=equal"),
        ("halo-balanced", "halo-lm|select=balanced|cap=2|repair=kv|weights=count"),
        ("halo-pair", "halo-lm:sinks=0|repair=pair|cont=next"),
    ]
    texts = [t for pair in pairs for t in pair]
    runs = simulate(lm, [(parse_candidate(t), stream) for t in texts], 16)
    for i, (preset, spelled) in enumerate(pairs):
        a, b = runs[2 * i], runs[2 * i + 1]
        np.testing.assert_allclose(a.nll, b.nll, atol=1e-5, err_msg=preset)
        assert (a.merges, a.evictions, a.merges_at) == (b.merges, b.evictions, b.merges_at)
        assert a.merges > 0, spelled


def test_a_renamed_preset_is_not_answered_from_the_cache():
    """Runs are cached by what they run: `halo` and `halo-lm` differ, `halo` and its spelled-out
    configuration differ only in the policy's class."""
    from positronic.bench.explore import resolved

    halo, lm_ = resolved(parse_candidate("halo")), resolved(parse_candidate("halo-lm"))
    assert halo != lm_ and halo["repair"] == "kv" and lm_["repair"] == "lm"
    assert resolved(parse_candidate("halo|lag=1")) != halo
