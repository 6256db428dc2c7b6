"""`positronic bench quality`: teacher-forced streaming evaluation (the StreamingLLM method) of
every policy at one budget, against references computed directly with the model.

Per policy: perplexity over every scored token of every stream, its ratio to the sliding-window
reference with a paired block-bootstrap 95% interval (stats.py), merges, evictions, and where
the merges landed; the perplexity over the far-recall tokens alone (tokens whose latest earlier
occurrence in the same story is more than `budget` tokens back, `stats.far_recall_mask`). Each
merging policy is also compared with the best eviction policy of the run: the paired ratio, and
the share of the gap between that policy and the full cache it closes (over every token and over
the far-recall tokens, on the part of each stream that fits the model's positions).
`summarize` is pure: runs and reference NLLs in, the JSON document out.
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
from positronic.loop import LoopConfig

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


def far_masks(streams: Sequence[Stream], budget: int) -> list[np.ndarray]:
    """Per stream, which scored tokens (token_ids[2:]) are far recalls at this budget."""
    return [
        stats.far_recall_mask(s.token_ids, budget, s.token_ids[0], reference.FIRST_SCORED)
        for s in streams
    ]


def summarize_policy(
    runs: list[StreamRun], refs: References, budget: int, far: list[np.ndarray], **ci_kw
) -> dict:
    runs = sorted(runs, key=lambda r: r.stream)
    nll = [r.nll for r in runs]
    far_nll = np.concatenate([np.asarray(n)[m] for n, m in zip(nll, far, strict=True)])
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
        "far_recall": {
            "perplexity": stats.perplexity(far_nll) if far_nll.size else float("nan"),
            "tokens": int(far_nll.size),
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
    far = far_masks(streams, budget)
    policies = {}
    for label in labels:
        mine = [r for r in runs if r.label == label]
        policies[label] = summarize_policy(mine, refs, budget, far, **ci_kw)
    _compare_with_best_eviction(policies, runs, refs, far, ci_kw)
    ci_method = next(iter(policies.values()))["ratio_ci95_method"]
    return {
        "budget": budget,
        "reference": {
            "name": "sliding window with recompute",
            "context": f"BOS + the {budget} tokens before each scored token",
            "perplexity": stats.perplexity(np.concatenate(refs.window)),
            "scored_tokens": scored,
            "far_recall_tokens": int(sum(m.sum() for m in far)),
            "far_recall_tokens_in_full_cache_part": int(
                sum(m[: len(f)].sum() for m, f in zip(far, refs.full, strict=True))
            ),
            "far_recall_definition": "predicted tokens whose latest earlier occurrence in the "
            f"same story is more than {budget} tokens back",
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


def _gap(policy, best, full, masks, ci_kw) -> dict:
    g = stats.gap_closed_ci(policy, best, full, masks=masks, **ci_kw)
    return {"value": g.value, "ci95": [g.lo, g.hi]}


def _compare_with_best_eviction(
    policies: dict, runs: list[StreamRun], refs: References, far: list[np.ndarray], ci_kw: dict
) -> None:
    """Each merging policy against the evicting policy with the lowest perplexity, paired
    token by token (the question the benchmark asks: does merging beat eviction?), and the
    share of that policy's gap to the full cache it closes (on the part that fits)."""
    evicting = [k for k, p in policies.items() if p["merges"] == 0 and p["evictions"] > 0]
    if not evicting:
        return
    best = min(evicting, key=lambda k: policies[k]["perplexity"])
    best_nll = nll_of(runs, best)
    prefix = [len(f) for f in refs.full]
    far_part = [m[:k] for m, k in zip(far, prefix, strict=True)]
    best_part = [n[:k] for n, k in zip(best_nll, prefix, strict=True)]
    for label, p in policies.items():
        if p["merges"] == 0:
            continue
        mine = nll_of(runs, label)
        mine_part = [n[:k] for n, k in zip(mine, prefix, strict=True)]
        c = _ci(mine, best_nll, **ci_kw)
        p["vs_best_eviction"] = {
            "baseline": best,
            "ratio": c["ratio"],
            "ratio_ci95": c["ratio_ci95"],
        }
        p["gap_closed"] = _gap(mine_part, best_part, refs.full, None, ci_kw)
        fr = p["far_recall"]
        if fr["tokens"]:
            c = _ci(mine, best_nll, masks=far, **ci_kw)
            fr["vs_best_eviction"] = {"ratio": c["ratio"], "ratio_ci95": c["ratio_ci95"]}
        if sum(m.sum() for m in far_part):
            fr["gap_closed"] = _gap(mine_part, best_part, refs.full, far_part, ci_kw)


def check_runnable(specs: Sequence[PolicySpec], budget: int) -> None:
    """Refuse, before any service starts, what the loop would refuse (a budget that the
    policy's protected rows fill)."""
    for spec in specs:
        try:
            LoopConfig(
                policy=spec.make(),
                target_rows=budget,
                attention_reduction=spec.reduction,
                repair_candidates=spec.candidates,
            )
        except ValueError as e:
            raise ValueError(f"{spec.label[:80]}: {e}") from None


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
        for spec in sorted(specs, key=lambda s: not s.make().merges)
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
                f"[{v['ratio_ci95'][0]:.4f}, {v['ratio_ci95'][1]:.4f}]; "
                f"gap to the full cache closed {_gap_text(p['gap_closed'])}"
            )
    lines.append(f"far recall ({ref['far_recall_tokens']} tokens: {ref['far_recall_definition']}):")
    for label, p in doc["policies"].items():
        fr = p["far_recall"]
        line = f"  {label:<26} {fr['perplexity']:>7.3f}"
        if "vs_best_eviction" in fr:
            v = fr["vs_best_eviction"]
            line += f" vs best eviction: x{v['ratio']:.4f} [{v['ratio_ci95'][0]:.4f}, "
            line += f"{v['ratio_ci95'][1]:.4f}]"
        if "gap_closed" in fr:
            line += f"; gap closed {_gap_text(fr['gap_closed'])}"
        lines.append(line)
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


def _gap_text(gap: dict) -> str:
    return f"{gap['value']:+.3f} [{gap['ci95'][0]:+.3f}, {gap['ci95'][1]:+.3f}]"
