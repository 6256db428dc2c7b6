"""`positronic bench quality`, `positronic bench speed` and `positronic bench patch`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from positronic.models import DEMO_MODEL, demo_model_dir

logger = logging.getLogger(__name__)

DEFAULT_POLICIES = "halo,streaming,h2o,tova"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    q = sub.add_parser("quality", help="teacher-forced perplexity of policies at one budget")
    q.add_argument(
        "--model",
        default=str(demo_model_dir()),
        help=f"model directory or hub id (default: the packaged {DEMO_MODEL})",
    )
    q.add_argument("--text-file", required=True, help="stories separated by <|endoftext|> lines")
    q.add_argument("--budget", type=int, required=True, help="cache rows (the loop's target)")
    q.add_argument(
        "--policies",
        default=DEFAULT_POLICIES,
        help=f"comma-separated policy specs (default {DEFAULT_POLICIES}; "
        "see positronic/bench/specs.py, e.g. halo:decay=0.5:gain=200)",
    )
    q.add_argument("--stream-tokens", type=int, default=1500, help="tokens per stream")
    q.add_argument("--streams", type=int, default=5, help="streams, each from its own stories")
    q.add_argument(
        "--first-story",
        type=int,
        default=300,
        help="story the first stream starts at (default 300; halo was tuned on stories 0-19)",
    )
    q.add_argument(
        "--processes",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="loop processes side by side, each with its own services (default: up to 2)",
    )
    q.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    q.add_argument("--json", help="write the results here")
    q.add_argument("--plot", help="write the running-NLL plot here (PNG)")
    q.add_argument("--nll-file", help="write every per-token NLL here (.npz), for analysis")

    s = sub.add_parser("speed", help="tokens/s, RPC latency, wire bytes and memory")
    from positronic.bench.speed import add_speed_arguments

    add_speed_arguments(s)

    pa = sub.add_parser("patch", help="Patch latency of the cache authority, by rows and edit")
    from positronic.bench.patch import add_patch_arguments

    add_patch_arguments(pa)


def run(args: argparse.Namespace) -> int:
    if args.bench == "quality":
        return run_quality(args)
    if args.bench == "patch":
        from positronic.bench.patch import run_patch

        return run_patch(args)
    from positronic.bench.speed import run_speed

    return run_speed(args)


def run_quality(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from positronic.bench import quality
    from positronic.bench.plot import plot_running_nll
    from positronic.bench.specs import parse_specs
    from positronic.bench.streams import streams_from_file

    try:
        specs = parse_specs(args.policies)
        if args.budget < 2:
            raise ValueError("--budget must be at least 2")
        quality.check_runnable(specs, args.budget)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        streams = streams_from_file(
            tokenizer, args.text_file, args.streams, args.stream_tokens, args.first_story
        )
    except (ValueError, OSError) as e:
        print(f"positronic bench quality: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    total = len(specs) * sum(len(s.token_ids) - 2 for s in streams)
    with tqdm(total=total, unit="tok", desc="quality", file=sys.stderr) as bar:
        refs, runs, elapsed = quality.evaluate(
            model_dir=args.model,
            streams=streams,
            specs=specs,
            budget=args.budget,
            processes=args.processes,
            threads=args.threads,
            progress=bar,
        )
    settings = {
        "model": args.model,
        "text_file": args.text_file,
        "stream_tokens": args.stream_tokens,
        "streams": args.streams,
        "first_story": args.first_story,
        "processes": args.processes,
        "threads": args.threads,
        "policy_specs": {s.label: {"policy": s.name, **s.settings} for s in specs},
        "elapsed_s": round(elapsed, 1),
    }
    doc = quality.summarize(
        budget=args.budget,
        streams=streams,
        refs=refs,
        runs=runs,
        labels=[s.label for s in specs],
        settings=settings,
    )
    print(quality.table(doc))
    print(f"({elapsed:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        curves = {s.label: quality.nll_of(runs, s.label) for s in specs}
        plot_running_nll(
            args.plot,
            curves,
            refs.window,
            refs.full,
            f"{Path(args.model).name}, budget {args.budget}, {len(streams)} streams × "
            f"{args.stream_tokens} tokens",
            "full cache" if refs.full_fits else f"full cache (first {refs.max_positions} tokens)",
        )
    if args.nll_file:
        save_nll(args.nll_file, refs, {s.label: quality.nll_of(runs, s.label) for s in specs})
    return 0


def save_nll(path: str, refs, curves: dict[str, list[list[float]]]) -> None:
    """Arrays [streams, tokens]: `reference`, `full_cache` (the part that fits), one per policy."""
    import numpy as np

    arrays = {"reference": np.asarray(refs.window), "full_cache": np.asarray(refs.full)}
    arrays.update({f"policy:{k}": np.asarray(v) for k, v in curves.items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
