"""Sampling: seeded and reproducible; greedy, top-k, top-p, repetition penalty; forced tokens."""

from __future__ import annotations

import pytest
import torch
from worker_fixtures import replica_of, rows_of, tiny_llama

from model_worker import calls
from model_worker.errors import WorkerError
from model_worker.sampling import Sampling, filter_top_k_top_p, penalize, sample, top_logprobs

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0, 0.0])


def test_same_seed_same_token_and_seeds_differ():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(0))
    s = Sampling(temperature=1.5, seed=1234)
    draws = {sample(logits, s) for _ in range(5)}
    assert len(draws) == 1
    assert len({sample(logits, Sampling(temperature=1.5, seed=k)) for k in range(30)}) > 1


def test_greedy_top_k_one_and_tiny_top_p_pick_the_argmax():
    assert sample(LOGITS, Sampling()) == 4
    assert all(sample(LOGITS, Sampling(temperature=2.0, top_k=1, seed=k)) == 4 for k in range(10))
    assert all(sample(LOGITS, Sampling(temperature=2.0, top_p=1e-6, seed=k)) == 4 for k in range(9))


def test_top_k_and_top_p_keep_the_right_sets():
    kept = torch.isfinite(filter_top_k_top_p(LOGITS, 2, 0.0)).nonzero().flatten().tolist()
    assert kept == [0, 4]
    probs = LOGITS.softmax(-1)
    order = torch.argsort(probs, descending=True)
    p = float(probs[order[:2]].sum()) - 1e-4  # reached by the top two tokens
    kept = torch.isfinite(filter_top_k_top_p(LOGITS, 0, p)).nonzero().flatten().tolist()
    assert sorted(kept) == sorted(order[:2].tolist())


def test_repetition_penalty_is_ctrl_style():
    out = penalize(LOGITS, [4, 3], 2.0)
    assert out[4] == pytest.approx(1.5) and out[3] == pytest.approx(-2.0)
    assert torch.equal(out[[0, 1, 2, 5]], LOGITS[[0, 1, 2, 5]])
    assert sample(LOGITS, Sampling(repetition_penalty=10.0), present=[4]) == 0


def test_top_logprobs_are_sorted():
    lp = LOGITS.log_softmax(-1)
    top = top_logprobs(lp, 3)
    assert [t for t, _ in top] == [4, 0, 1]
    assert top[0][1] == pytest.approx(float(lp[4]))


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1.0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"repetition_penalty": float("nan")},
        {"temperature": float("inf")},
        {"temperature": 100.5},
        {"repetition_penalty": 1e-45},  # issue 12: NaN probabilities in torch.multinomial
        {"repetition_penalty": 0.009},
        {"repetition_penalty": 101.0},
    ],
)
def test_bad_sampling_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        Sampling(**bad)


@pytest.mark.parametrize("top_k", [0, 3])
@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 1e-30, 1e-6])
def test_a_tiny_temperature_draws_the_argmax_not_nan(temperature, top_k):
    """Issue 12: temperature 1e-38 made logits / temperature overflow to inf and softmax NaN."""
    t = float(torch.tensor(temperature, dtype=torch.float32))  # as it arrives on the wire
    logits = torch.randn(512, generator=torch.Generator().manual_seed(1)) * 10
    for seed in range(5):
        s = Sampling(temperature=t, top_k=top_k, top_p=0.9, seed=seed)
        assert sample(logits, s) == int(torch.argmax(logits))


def test_the_edges_of_the_ranges_are_accepted_and_defined():
    wire = float(torch.tensor(0.01, dtype=torch.float32))  # 0.0099999998 as float32
    huge = torch.tensor([3e38, 1.0, -3e38, 0.5])
    for penalty in (wire, 100.0):
        s = Sampling(temperature=100.0, repetition_penalty=penalty, seed=3)
        assert 0 <= sample(huge, s, present=[0, 2]) < 4
    assert sample(huge, Sampling(temperature=1e-38, repetition_penalty=wire), present=[0]) == 0


@pytest.fixture(scope="module")
def tiny_rows():
    lm = tiny_llama()
    return lm, rows_of(replica_of(lm, [1, 5, 9, 14, 20, 7]))


def test_step_sampling_is_reproducible(tiny_rows):
    lm, rows = tiny_rows
    params = calls.StepParams(input_token_id=11, sampling=Sampling(temperature=1.0, seed=7))
    a = calls.step(lm, rows, params)
    b = calls.step(lm, rows, params)
    assert a.next_token_id == b.next_token_id
    assert a.next_token_logprob == b.next_token_logprob
    torch.testing.assert_close(a.output.logits, b.output.logits, atol=0, rtol=0)


def test_forced_token_returns_its_logprob(tiny_rows):
    lm, rows = tiny_rows
    free = calls.step(lm, rows, calls.StepParams(input_token_id=11, top_logprobs=5))
    logprobs = free.output.logits.log_softmax(-1)
    assert free.next_token_id == int(torch.argmax(logprobs))
    assert free.top_logprobs[0][0] == free.next_token_id
    assert len(free.top_logprobs) == 5
    forced_id = int(torch.argmin(logprobs))
    forced = calls.step(
        lm, rows, calls.StepParams(input_token_id=11, forced_next_token_id=forced_id)
    )
    assert forced.next_token_id == forced_id
    assert forced.next_token_logprob == pytest.approx(float(logprobs[forced_id]), abs=1e-6)


@pytest.mark.parametrize(
    "params",
    [
        calls.StepParams(input_token_id=-1),
        calls.StepParams(input_token_id=10**6),
        calls.StepParams(input_token_id=3, forced_next_token_id=10**6),
        calls.StepParams(input_token_id=3, top_logprobs=-1),
    ],
)
def test_malformed_steps_are_invalid_argument(tiny_rows, params):
    lm, rows = tiny_rows
    with pytest.raises(WorkerError) as e:
        calls.step(lm, rows, params)
    assert e.value.code == "INVALID_ARGUMENT"


def test_positions_past_the_model_are_refused(tiny_rows):
    lm, rows = tiny_rows
    with pytest.raises(WorkerError) as e:
        calls.check_prefill(lm, rows.count, [3] * lm.max_positions, 1, 0)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    for bad in ([], [3], [3]):
        with pytest.raises(WorkerError):
            calls.check_prefill(lm, rows.count, bad, rows.count + 1 if bad else 0, 0)
    with pytest.raises(WorkerError) as e:
        calls.compute_kv(lm, rows, [(rows.count + 1, 3)])
    assert e.value.code == "INVALID_ARGUMENT"
