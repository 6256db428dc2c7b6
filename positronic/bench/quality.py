"""`positronic bench quality`: teacher-forced streaming evaluation (the StreamingLLM method) of
every policy at one budget, against references computed directly with the model.

Per policy: perplexity over every scored token of every stream, its ratio to the sliding-window
reference with a paired block-bootstrap 95% interval (stats.py), merges, evictions, and where
the merges landed. `summarize` is pure: runs and reference NLLs in, the JSON document out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from positronic.bench import reference, stats
from positronic.bench.runner import Job, StreamRun, run_jobs
from positronic.bench.specs import PolicySpec
from positronic.bench.streams import Stream

POSITION_BINS = 10  # merge positions are reported as a histogram over tenths of the budget


@dataclass(frozen=True)
class References:
    window: list[list[float]]  # per stream, sliding window with recompute
    full: list[list[float]]  # per stream, full cache over the part that fits
    full_fits: bool  # the whole stream fits the model's positions
    max_positions: int


def compute_references(model, streams: Sequence[Stream], budget: int) -> References:
    limit = reference.max_positions(model) or max(len(s.token_ids) for s in streams)
    window = [reference.sliding_window_nll(model, s.token_ids, budget) for s in streams]
    full = [reference.full_cache_nll(model, s.token_ids[:limit]) for s in streams]
    fits = all(len(s.token_ids) <= limit for s in streams)
    return References(window, full, fits, limit)


def _ci(policy: list[list[float]], ref: list[list[float]], **kw) -> dict:
    r = stats.ratio_ci(policy, ref, **kw)
    return {"ratio": r.ratio, "ratio_ci95": [r.lo, r.hi], "method": r.method}


def summarize_policy(runs: list[StreamRun], refs: References, budget: int, **ci_kw) -> dict:
    runs = sorted(runs, key=lambda r: r.stream)
    nll = [r.nll for r in runs]
    vs_window = _ci(nll, refs.window, **ci_kw)
    prefix = [len(f) for f in refs.full]
    vs_full = _ci([n[:k] for n, k in zip(nll, prefix, strict=True)], refs.full, **ci_kw)
    positions = [p for r in runs for p in r.merge_positions]
    hist: list[int] = []
    if positions:
        hist = np.histogram(positions, bins=POSITION_BINS, range=(0, budget))[0].tolist()
    merged_rows = sum(r.merged_rows for r in runs)
    return {
        "perplexity": stats.perplexity(np.concatenate(nll)),
        "ratio": vs_window["ratio"],
        "ratio_ci95": vs_window["ratio_ci95"],
        "ratio_ci95_method": vs_window["method"],
        "merges": sum(r.merges for r in runs),
        "evictions": sum(r.evictions for r in runs),
        "max_rows": max(r.max_rows for r in runs),
        "consistent": all(r.consistent for r in runs),
        "tokens_per_s": float(np.mean([r.tokens_per_s for r in runs])),
        "per_stream_perplexity": [stats.perplexity(n) for n in nll],
        "full_cache_part": {
            "perplexity": stats.perplexity(
                np.concatenate([n[:k] for n, k in zip(nll, prefix, strict=True)])
            ),
            "ratio": vs_full["ratio"],
            "ratio_ci95": vs_full["ratio_ci95"],
        },
        "merge_position_histogram": [int(x) for x in hist],
        "merged_rows_at_end": merged_rows,
        "merged_rows_keeping_a_pair_token": sum(r.merged_kept_original for r in runs),
    }


def summarize(
    *,
    budget: int,
    streams: Sequence[Stream],
    refs: References,
    runs: list[StreamRun],
    labels: Sequence[str],
    settings: dict,
    block: int = stats.DEFAULT_BLOCK,
    resamples: int = stats.DEFAULT_RESAMPLES,
) -> dict:
    """The JSON document (see docs/benchmarks.md for every field)."""
    ci_kw = {"block": block, "resamples": resamples}
    scored = sum(len(w) for w in refs.window)
    full_tokens = sum(len(f) for f in refs.full)
    stream_tokens = len(streams[0].token_ids)
    full_note = (
        "every stream fits the model's positions: full cache over whole streams"
        if refs.full_fits
        else f"streams of {stream_tokens} tokens pass the model's {refs.max_positions} "
        f"positions: the full cache is scored on each stream's first {refs.max_positions} "
        "tokens only, and so is every policy's `full_cache_part`"
    )
    policies = {}
    for label in labels:
        mine = [r for r in runs if r.label == label]
        policies[label] = summarize_policy(mine, refs, budget, **ci_kw)
    _compare_with_best_eviction(policies, runs, ci_kw)
    ci_method = next(iter(policies.values()))["ratio_ci95_method"]
    return {
        "budget": budget,
        "reference": {
            "name": "sliding window with recompute",
            "context": f"BOS + the {budget} tokens before each scored token",
            "perplexity": stats.perplexity(np.concatenate(refs.window)),
            "scored_tokens": scored,
            "full_cache": {
                "fits": refs.full_fits,
                "perplexity": stats.perplexity(np.concatenate(refs.full)),
                "scored_tokens": full_tokens,
                "note": full_note,
            },
        },
        "policies": policies,
        "streams": [
            {"first_story": s.first_story, "stories": s.stories, "tokens": len(s.token_ids)}
            for s in streams
        ],
        "ratio_ci95_method": ci_method,
        "settings": settings,
    }


def nll_of(runs: list[StreamRun], label: str) -> list[list[float]]:
    return [r.nll for r in sorted(runs, key=lambda r: r.stream) if r.label == label]


def _compare_with_best_eviction(policies: dict, runs: list[StreamRun], ci_kw: dict) -> None:
    """Each merging policy against the evicting policy with the lowest perplexity, paired
    token by token (the question the benchmark asks: does merging beat eviction?)."""
    evicting = [k for k, p in policies.items() if p["merges"] == 0 and p["evictions"] > 0]
    if not evicting:
        return
    best = min(evicting, key=lambda k: policies[k]["perplexity"])
    for label, p in policies.items():
        if p["merges"] > 0:
            c = _ci(nll_of(runs, label), nll_of(runs, best), **ci_kw)
            p["vs_best_eviction"] = {
                "baseline": best,
                "ratio": c["ratio"],
                "ratio_ci95": c["ratio_ci95"],
            }


def evaluate(
    *,
    model_dir: str,
    streams: list[Stream],
    specs: list[PolicySpec],
    budget: int,
    processes: int,
    threads: int,
    progress,
) -> tuple[References, list[StreamRun], float]:
    """References, then every (policy, stream) run; the slowest (merging) jobs start first."""
    t0 = time.perf_counter()
    model = reference.load_reference_model(model_dir)
    refs = compute_references(model, streams, budget)
    del model
    jobs = [
        Job(spec, i, s.token_ids, budget)
        for spec in sorted(specs, key=lambda s: s.name != "halo")
        for i, s in enumerate(streams)
    ]
    runs = list(
        run_jobs(model_dir, jobs, processes=processes, threads=threads, on_step=progress.update)
    )
    return refs, runs, time.perf_counter() - t0


def table(doc: dict) -> str:
    """The table people read (what docs/benchmarks.md publishes)."""
    ref = doc["reference"]
    lines = [
        f"budget {doc['budget']} rows; {len(doc['streams'])} streams, "
        f"{ref['scored_tokens']} scored tokens",
        f"{'policy':<28} {'ppl':>7} {'ratio':>7} {'95% CI':>17} {'merges':>7} {'evict':>7}",
        f"{'sliding window (reference)':<28} {ref['perplexity']:>7.3f} {1.0:>7.3f}",
    ]
    for label, p in doc["policies"].items():
        lo, hi = p["ratio_ci95"]
        ci = f"[{lo:.3f}, {hi:.3f}]"
        lines.append(
            f"{label:<28} {p['perplexity']:>7.3f} {p['ratio']:>7.3f} {ci:>17} "
            f"{p['merges']:>7} {p['evictions']:>7}"
        )
    for label, p in doc["policies"].items():
        if "vs_best_eviction" in p:
            v = p["vs_best_eviction"]
            lines.append(
                f"{label} vs {v['baseline']} (best eviction, paired): x{v['ratio']:.4f} "
                f"[{v['ratio_ci95'][0]:.4f}, {v['ratio_ci95'][1]:.4f}]"
            )
    full = ref["full_cache"]
    lines.append(f"full cache: perplexity {full['perplexity']:.3f} ({full['note']})")
    if not full["fits"]:
        for label, p in doc["policies"].items():
            part = p["full_cache_part"]
            lines.append(
                f"  {label:<26} {part['perplexity']:>7.3f} vs full cache: x{part['ratio']:.3f} "
                f"[{part['ratio_ci95'][0]:.3f}, {part['ratio_ci95'][1]:.3f}]"
            )
    lines.append(f"CI: {doc['ratio_ci95_method']}")
    return "\n".join(lines)
