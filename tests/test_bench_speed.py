"""`positronic bench speed`: the pure summaries, and one in-process measurement."""

from __future__ import annotations

import argparse

import pytest

from positronic.bench import speed
from positronic.bench.wire import CallRecord, Iteration, WireRecorder
from positronic.bench.wire_stats import (
    hop_bytes,
    iteration_bytes,
    rate_by_tenth,
    rate_windows,
    summarize_latency,
)


def test_recorder_cuts_iterations_at_patches():
    rec = WireRecorder()
    rec.record("/x/Patch", 0.01, 500, 10)  # the prime: not an iteration
    rec.record("/x/Step", 0.002, 60, 900, rows=5)
    rec.record("/x/Patch", 0.001, 300, 10)
    rec.record("/x/Step", 0.002, 60, 904, rows=6)
    rec.record("/x/Repair", 0.004, 40, 80)
    rec.record("/x/Patch", 0.001, 700, 10, edits=1)
    assert [(i.bytes, i.rows, i.edited) for i in rec.iterations] == [
        (1270, 5, False),
        (1794, 6, True),
    ]


def test_a_tick_with_replacements_marks_its_iteration_edited():
    rec = WireRecorder()
    rec.record("/x/Patch", 0.01, 500, 10)  # the prime
    rec.record("/x/Tick", 0.002, 60, 900, rows=5)
    rec.record("/x/Patch", 0.001, 300, 10)
    rec.record("/x/Tick", 0.002, 70, 1200, rows=6, edits=1)
    rec.record("/x/Patch", 0.001, 700, 10, edits=1)
    assert [(i.bytes, i.rows, i.edited) for i in rec.iterations] == [
        (1270, 5, False),
        (1980, 6, True),
    ]


def test_hop_bytes_count_each_hop_once_and_leave_the_prime_out():
    calls = [
        CallRecord("Patch", 0.0, 5000, 10),  # the prime
        CallRecord("Tick", 0.0, 60, 900),
        CallRecord("Patch", 0.0, 300, 10),
        CallRecord("Tick", 0.0, 60, 1100),
        CallRecord("Patch", 0.0, 500, 10),
        CallRecord("Watch", 0.0, 10, 99),  # on no hop a token's K/V crosses
    ]
    assert hop_bytes(calls, sync_bytes=1000, iterations=2) == {
        "worker_to_driver": 1000.0,
        "driver_to_authority": 400.0,
        "authority_to_worker": 500.0,
    }


def test_iteration_bytes_fit_separates_fixed_and_per_row():
    its = [Iteration(1000 + 8 * r, r, False, 0.0) for r in range(10, 60)]
    its += [Iteration(5000, 60, True, 0.0)] * 5
    out = iteration_bytes(its, sync_bytes=55 * 100)
    fit = out["driver_bytes_fit"]
    assert fit["fixed"] == pytest.approx(1000) and fit["per_row"] == pytest.approx(8)
    assert out["sync_per_iteration"] == pytest.approx(100)
    assert out["edited_iterations"] == 5 and out["driver_per_edited_iteration"] == 5000


def test_rate_windows_and_latency():
    stamps = [i * 0.01 for i in range(1200)]  # 100 tokens/s throughout
    rates = rate_windows(stamps)
    assert set(rates) == {"100", "1000", "end"}
    assert all(r == pytest.approx(100.0) for r in rates.values())
    tenths = rate_by_tenth(stamps)
    assert len(tenths) == 10 and all(r == pytest.approx(100.0) for r in tenths)
    calls = [CallRecord("Step", ms / 1000, 10, 20) for ms in range(1, 101)]
    s = summarize_latency(calls)["Step"]
    assert s["calls"] == 100 and s["p50_ms"] == pytest.approx(50.5)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["p50_ms_by_tenth"] == pytest.approx([5.5 + 10 * i for i in range(10)])


def test_plan_and_ratios():
    args = argparse.Namespace(
        tokens=50,
        budget=16,
        modes="hf_generate,grpc_split",
        policies="halo-lm",
        device="cuda:1",
        dtype="bfloat16",
    )
    runs = speed.plan_runs(args, "/m", threads=1)
    assert [(r["mode"], r["policy"]) for r in runs] == [
        ("hf_generate", "none"),
        ("grpc_split", "halo-lm"),
    ]
    assert {(r["device"], r["dtype"]) for r in runs} == {("cuda:1", "bfloat16")}
    out = speed.with_ratios(
        [
            {"mode": "hf_generate", "tokens_per_s": 100.0},
            {"mode": "grpc_split", "tokens_per_s": 25.0, "wire_bytes": {"per_iteration": 9.0}},
        ]
    )
    assert out[1]["ratio_to_hf_generate"] == 0.25 and out[1]["bytes_per_iteration"] == 9.0


def test_in_process_measurement(stories260k_dir):
    from positronic.bench.speed_run import run_in_process

    run = {
        "mode": "in_process",
        "policy": "halo-lm",
        "model": str(stories260k_dir),
        "tokens": 40,
        "budget": 16,
        "prompt": "Once upon a time",
    }
    out = run_in_process(run)
    assert out["tokens_generated"] == 40 and out["max_rows"] <= 16
    assert out["mutating_rpcs"] == out["iterations"] + 1 and out["merges"] > 0
    # one Tick and one Patch per iteration; the old per-token RPCs are gone from the path
    assert {"Tick", "Patch"} <= set(out["rpc_latency"])
    assert not {"Step", "Repair", "ComputeKV", "Detokenize"} & set(out["rpc_latency"])
    assert out["rpcs_per_iteration"] == 2.0
    assert out["merging_iterations"] > 0 and out["forwards_per_merging_iteration"] == 2.0
    assert 1.0 <= out["forwards_per_iteration"] < 2.0
    wire = out["wire_bytes"]
    assert wire["edited_iterations"] > 0 and wire["sync_per_iteration"] > 0
    hops = wire["per_hop"]
    assert hops["authority_to_worker"] == wire["sync_per_iteration"]
    assert hops["worker_to_driver"] > 0 and hops["driver_to_authority"] > 0
    assert out["peak_rss_bytes"]["process"] > 0
    # the replica-follow hop, from the worker's metrics: one observation per followed delta
    follow = out["follow"]
    assert 0 < follow["deltas"] <= out["iterations"] + 1
    assert follow["apply_mean_ms"] > 0 and follow["lag_mean_ms"] > 0


def test_follow_costs_read_the_same_from_a_registry_and_a_scraped_page():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from model_worker.metrics import WorkerMetrics
    from positronic.bench.processes import follow_costs

    metrics = WorkerMetrics()
    metrics.followed(0.001, 0.004)
    metrics.followed(0.003, -1.0)  # another host's clock ahead: no negative lag
    want = {"deltas": 2, "apply_mean_ms": 2.0, "lag_mean_ms": 2.0}
    assert follow_costs(metrics.registry.collect()) == pytest.approx(want)
    page = generate_latest(metrics.registry).decode()
    assert follow_costs(text_string_to_metric_families(page)) == pytest.approx(want)
