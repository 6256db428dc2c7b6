"""`python -m positronic.bench.explore`: the merging search, on a simulator of the loop.

Runs configurations (explore_run.Candidate: a policy spec plus repairer, selection, lag...)
over teacher-forced streams at several budgets, with the cache edited directly by the HF model
(no services), and summarizes them with exactly the metrics of `positronic bench quality`
(quality.summarize: ratios to the sliding window, the paired ratio to the best eviction
policy, far recall, gap closed). Every run's NLLs and every reference are cached on disk, keyed
by what determines them, so a search can grow one candidate at a time.

    python -m positronic.bench.explore --model ../shared/models/stories260K \\
        --text-file ../shared/data/tinystories_dev.txt --first-story 0 --budgets 64,96 \\
        --candidates "streaming,halo|lag=1,halo|weights=equal|lag=1" --json out/search.json

The simulator is validated against the real loop (docs/quality-search.md): for `streaming` and
`halo-lm` its per-token NLLs equal `bench quality --nll-file`'s to float precision. (`halo`, a
K/V merge, needs the worker's Tick in the real loop; its simulation uses the same pure policy
code and the K/V arithmetic tested in tests/test_bench_explore.py.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from positronic.bench import quality, reference, stats
from positronic.bench.explore_run import Candidate, SimRun, parse_candidate, simulate
from positronic.bench.runner import StreamRun
from positronic.bench.streams import Stream, streams_from_file

CACHE_VERSION = "1"  # bump when the simulator's semantics change: old cached runs are ignored


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts]).encode()).hexdigest()[:24]


def _stream_key(stream: Stream) -> str:
    return hashlib.sha256(np.asarray(stream.token_ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def cached_references(model_dir: str, streams: list[Stream], budget: int, cache_dir: Path):
    """quality.References for these streams and budget, from disk when computed before."""
    path = cache_dir / f"ref-{_key([_stream_key(s) for s in streams], budget)}.npz"
    if path.exists():
        z = np.load(path)
        n = len(streams)
        return quality.References(
            [z[f"w{i}"].tolist() for i in range(n)],
            [z[f"f{i}"].tolist() for i in range(n)],
            bool(z["fits"]),
            int(z["limit"]),
        )
    model = reference.load_reference_model(model_dir)
    refs = quality.compute_references(model, streams, budget)
    arrays = {f"w{i}": np.asarray(w) for i, w in enumerate(refs.window)}
    arrays |= {f"f{i}": np.asarray(f) for i, f in enumerate(refs.full)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, fits=refs.full_fits, limit=refs.max_positions, **arrays)  # type: ignore[arg-type]
    return refs


def resolved(cand: Candidate) -> dict:
    """What a candidate runs, whatever its text calls it: a preset renamed or retuned (as `halo`
    was) must not be answered from a run cached under its old meaning."""
    policy = cand.policy.make()
    settings = {
        f.name: getattr(cand, f.name) for f in fields(cand) if f.name not in ("text", "policy")
    }
    return {
        "policy": type(policy).__name__,
        "parameters": policy.parameters(),
        "merges": policy.merges,
        "repair_spec": asdict(policy.repair) if policy.repair else None,
        "reduction": cand.policy.reduction,
        "candidates": cand.policy.candidates,
        **settings,
    }


def _run_path(cache_dir: Path, cand: Candidate, stream: Stream, budget: int) -> Path:
    return cache_dir / f"run-{_key(resolved(cand), budget, _stream_key(stream))}.json"


def cached_runs(
    lm, cands: list[Candidate], streams: list[Stream], budget: int, cache_dir: Path
) -> dict[tuple[str, int], SimRun]:
    """Every (candidate, stream) at this budget: from disk, or simulated in batches (one per
    `bias` setting) and saved."""
    out: dict[tuple[str, int], SimRun] = {}
    todo: dict[bool, list[tuple[Candidate, int]]] = {}
    for cand in cands:
        for i, stream in enumerate(streams):
            path = _run_path(cache_dir, cand, stream, budget)
            if path.exists():
                out[cand.text, i] = SimRun(**json.loads(path.read_text()))
            else:
                todo.setdefault(cand.bias, []).append((cand, i))
    cache_dir.mkdir(parents=True, exist_ok=True)
    for group in todo.values():
        t0 = time.perf_counter()
        runs = simulate(lm, [(c, streams[i].token_ids) for c, i in group], budget)
        for (cand, i), run in zip(group, runs, strict=True):
            _run_path(cache_dir, cand, streams[i], budget).write_text(json.dumps(run.__dict__))
            out[cand.text, i] = run
        took = time.perf_counter() - t0
        print(f"budget {budget}: {len(group)} runs simulated in {took:.0f} s", file=sys.stderr)
    return out


def as_stream_run(label: str, index: int, run: SimRun, budget: int) -> StreamRun:
    return StreamRun(
        label=label,
        stream=index,
        nll=run.nll,
        merges=run.merges,
        evictions=run.evictions,
        max_rows=budget,
        tokens_per_s=0.0,
        consistent=True,
        merged_rows=run.merged_rows_at_end,
    )


def candidate_texts(arg: str) -> list[str]:
    """Comma-separated candidates, or @FILE: one per line (# starts a comment)."""
    if arg.startswith("@"):
        lines = Path(arg[1:]).read_text(encoding="utf-8").splitlines()
        return [t.split("#")[0].strip() for t in lines if t.split("#")[0].strip()]
    return [t.strip() for t in arg.split(",") if t.strip()]


def search(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer

    from model_worker.model import load_model

    torch.set_num_threads(args.threads)
    cands = [parse_candidate(t) for t in candidate_texts(args.candidates)]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    streams = streams_from_file(
        tokenizer, args.text_file, args.streams, args.stream_tokens, args.first_story
    )
    lm = load_model(args.model, device="cpu", dtype="float32")
    cache_dir = Path(args.cache_dir)
    docs = {}
    for budget in [int(b) for b in args.budgets.split(",")]:
        refs = cached_references(args.model, streams, budget, cache_dir)
        done = cached_runs(lm, cands, streams, budget, cache_dir)
        far = quality.far_masks(streams, budget)
        runs, forwards = [], {}
        for cand in cands:
            sims = [done[cand.text, i] for i in range(len(streams))]
            runs += [as_stream_run(cand.text, i, r, budget) for i, r in enumerate(sims)]
            merges = sum(r.merges for r in sims)
            forwards[cand.text] = {
                "extra_forwards": sum(r.forwards for r in sims),
                "per_merge": sum(r.forwards for r in sims) / merges if merges else 0.0,
                "max_tokens_in_a_row": max(r.max_count_at_end for r in sims),
            }
        doc = quality.summarize(
            budget=budget,
            streams=streams,
            refs=refs,
            runs=runs,
            labels=[c.text for c in cands],
            settings={"simulator": True, "first_story": args.first_story},
        )
        for label, extra in forwards.items():
            doc["policies"][label]["cost"] = extra
            if args.versus and label != args.versus:
                doc["policies"][label]["versus"] = _versus(runs, label, args.versus, far)
            nll = np.asarray([r.nll for r in runs if r.label == label])  # [streams, T]
            doc["policies"][label]["perplexity_by_tenth"] = [
                float(np.exp(part.mean())) for part in np.array_split(nll, 10, axis=1)
            ]
        docs[str(budget)] = doc
        print(quality.table(doc))
    return docs


def _versus(runs: list[StreamRun], label: str, other: str, far) -> dict:
    """Paired ratios of `label` to `other` over every token and over the far-recall tokens."""
    mine, theirs = quality.nll_of(runs, label), quality.nll_of(runs, other)
    plain = stats.ratio_ci(mine, theirs)
    far_r = stats.ratio_ci(mine, theirs, masks=far)
    return {
        "baseline": other,
        "ratio": plain.ratio,
        "ratio_ci95": [plain.lo, plain.hi],
        "far_ratio": far_r.ratio,
        "far_ratio_ci95": [far_r.lo, far_r.hi],
    }


def _ci_text(v: dict | None, key: str = "ratio", ci: str = "ratio_ci95", fmt=".4f") -> str:
    if not v:
        return ""
    lo, hi = v[ci]
    return f"{v[key]:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe inside a table cell, even in code, splits it


def markdown(doc: dict) -> str:
    """One budget's results as the table docs/quality-search.md publishes."""
    ref = doc["reference"]
    best = next(
        (
            p["vs_best_eviction"]["baseline"]
            for p in doc["policies"].values()
            if "vs_best_eviction" in p
        ),
        "",
    )
    n = len(doc["streams"])
    full = ref["full_cache"]
    far_part = ref["far_recall_tokens_in_full_cache_part"]
    lines = [
        f"Budget {doc['budget']}: {n} streams from story {doc['streams'][0]['first_story']}, "
        f"{ref['scored_tokens']} scored tokens, {ref['far_recall_tokens']} far-recall tokens "
        f"({far_part} where the full cache fits); sliding window {ref['perplexity']:.3f}, "
        f"full cache {full['perplexity']:.3f} (first {full['scored_tokens'] // n + 2} tokens of "
        f"each stream). Best eviction: `{best}`.",
        "",
        "| candidate | ppl | × best eviction [95% CI] | gap closed | far ppl | far × best eviction "
        "| far gap closed | fwd/merge |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, p in doc["policies"].items():
        fr = p["far_recall"]
        cost = p.get("cost", {})
        fwd = f"{cost['per_merge']:.1f}" if p["merges"] else ""
        lines.append(
            f"| `{_cell(label)}` | {p['perplexity']:.3f} | {_ci_text(p.get('vs_best_eviction'))} | "
            f"{_ci_text(p.get('gap_closed'), 'value', 'ci95', '+.3f')} | {fr['perplexity']:.3f} | "
            f"{_ci_text(fr.get('vs_best_eviction'))} | "
            f"{_ci_text(fr.get('gap_closed'), 'value', 'ci95', '+.3f')} | {fwd} |"
        )
    versus = [(k, p["versus"]) for k, p in doc["policies"].items() if "versus" in p]
    if versus:
        lines += ["", f"Paired with `{versus[0][1]['baseline']}` (plain; far recall):", ""]
        for label, v in versus:
            far = _ci_text(v, "far_ratio", "far_ratio_ci95")
            lines.append(f"- `{label}`: ×{_ci_text(v)}; far ×{far}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m positronic.bench.explore", description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--text-file", required=True)
    p.add_argument("--budgets", default="64,96,128")
    p.add_argument(
        "--candidates", required=True, help="comma-separated candidates, or @FILE (one a line)"
    )
    p.add_argument("--streams", type=int, default=5)
    p.add_argument("--stream-tokens", type=int, default=1500)
    p.add_argument("--first-story", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default="out/explore")
    p.add_argument("--json", help="write {budget: bench-quality document} here")
    p.add_argument("--markdown", help="write the tables (one per budget) here")
    p.add_argument("--versus", help="also compare every candidate with this one (paired)")
    args = p.parse_args(argv)
    docs = search(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(docs, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        tables = "\n\n".join(markdown(d) for d in docs.values())
        Path(args.markdown).write_text(tables + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
