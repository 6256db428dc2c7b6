"""`positronic bench speed`: one generation measured three ways in one run, for halo and full.

Each run reports tokens/s (overall, around tokens 100/1,000/10,000, by tenth), its ratio to HF
`generate`, the calls on the critical path per iteration (`rpcs_per_iteration`: Tick + Patch;
the replica's follow stream is off that path), the worker's forward passes per iteration and per
merging iteration, bytes per iteration (per hop: worker -> driver, driver -> authority,
authority -> worker), RPC latencies, the replica-follow hop (mean apply of each committed delta
and its commit -> applied lag, from the worker's metrics: `follow` in the JSON) and peak memory.

- hf_generate: Hugging Face `generate` with a growing DynamicCache (the baseline);
- in_process: the loop with both services in this process, servicers called directly;
- grpc_split: the loop over loopback gRPC, authority and worker in their own processes.

Every measurement runs in a fresh process (speed_run.py) so its peak memory is its own.
`--shape tinyllama` measures a randomly initialised model of TinyLlama-1.1B's exact shape
(speed does not depend on weight values), saved once to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from positronic.models import DEMO_MODEL, demo_model_dir

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TOKENIZER = REPO.parent / "shared" / "models" / "llama2-tokenizer"
MODES = ("hf_generate", "in_process", "grpc_split")
PROMPT = "Once upon a time"

# TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T's config.json, weights aside.
TINYLLAMA_SHAPE = {
    "num_hidden_layers": 22,
    "hidden_size": 2048,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "intermediate_size": 5632,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help=f"model directory or hub id (default: the packaged {DEMO_MODEL}, unless --shape)",
    )
    p.add_argument(
        "--shape",
        choices=("tinyllama",),
        help="measure a randomly initialised model of this shape instead of --model's weights",
    )
    p.add_argument(
        "--tokenizer",
        default=str(DEFAULT_TOKENIZER),
        help="tokenizer for --shape (default ../shared/models/llama2-tokenizer)",
    )
    p.add_argument("--tokens", type=int, default=1200, help="tokens to generate (default 1200)")
    p.add_argument("--budget", type=int, default=96, help="halo's cache rows (default 96)")
    p.add_argument("--policies", default="halo,full", help="loop policies (default halo,full)")
    p.add_argument("--modes", default=",".join(MODES), help=f"default {','.join(MODES)}")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads in every process (default: 1 for --model, all cores for --shape)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where HF generate and the worker compute: cpu, cuda or cuda:N (default cpu)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="weights and replicas, for HF generate and the worker alike (default float32)",
    )
    p.add_argument("--json", help="write the results here")


def make_shape_model(shape: str, tokenizer_dir: str, out_dir: Path) -> Path:
    """A random LlamaForCausalLM of `shape` with the given tokenizer, saved to out_dir."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    assert shape == "tinyllama"
    config = LlamaConfig(**TINYLLAMA_SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


def measure(run: dict, workdir: Path) -> dict:
    """One speed_run in a fresh process."""
    name = f"{run['mode']}-{run['policy']}"
    spec, out = workdir / f"{name}.run.json", workdir / f"{name}.out.json"
    spec.write_text(json.dumps(run))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if run.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(run["threads"])
    proc = subprocess.run(
        [sys.executable, "-m", "positronic.bench.speed_run", str(spec), str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        return {"mode": run["mode"], "policy": run["policy"], "error": proc.stderr[-3000:]}
    return json.loads(out.read_text())


def plan_runs(args: argparse.Namespace, model_dir: str, threads: int) -> list[dict]:
    base = {"model": model_dir, "tokens": args.tokens, "budget": args.budget, "prompt": PROMPT}
    base["threads"] = threads
    base["device"] = getattr(args, "device", "cpu")
    base["dtype"] = getattr(args, "dtype", "float32")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    runs = [{**base, "mode": "hf_generate", "policy": "none"}] if "hf_generate" in modes else []
    for mode in (m for m in MODES[1:] if m in modes):
        runs += [{**base, "mode": mode, "policy": p} for p in policies]
    return runs


def with_ratios(runs: list[dict]) -> list[dict]:
    base = next((r for r in runs if r["mode"] == "hf_generate" and "error" not in r), None)
    for r in runs:
        if base and "tokens_per_s" in r:
            r["ratio_to_hf_generate"] = r["tokens_per_s"] / base["tokens_per_s"]
        wire = r.get("wire_bytes") or {}
        if "per_iteration" in wire:
            r["bytes_per_iteration"] = wire["per_iteration"]
    return runs


def table(doc: dict) -> str:
    nan = float("nan")
    lines = [
        f"{'mode':<12} {'policy':<9} {'tokens':>6} {'tok/s':>7} {'x HF':>6} {'@1000':>7} "
        f"{'@10000':>7} {'RPC/it':>6} {'fwd/it':>6} {'fwd/mrg':>7} {'B/iter':>9} "
        f"{'peak RSS MiB':>18}",
    ]
    for r in doc["runs"]:
        if "error" in r:
            lines.append(f"{r['mode']:<12} {r['policy']:<9} failed: {r['error'][-300:]}")
            continue
        at = r.get("tokens_per_s_at", {})
        rss = "+".join(f"{v / 2**20:.0f}" for v in r["peak_rss_bytes"].values())
        bpi = r.get("bytes_per_iteration")
        merging = r.get("forwards_per_merging_iteration") if r.get("merging_iterations") else nan
        lines.append(
            f"{r['mode']:<12} {r['policy']:<9} {r['tokens_generated']:>6} "
            f"{r['tokens_per_s']:>7.1f} {r.get('ratio_to_hf_generate', 1.0):>6.2f} "
            f"{at.get('1000', nan):>7.1f} {at.get('10000', nan):>7.1f} "
            f"{r.get('rpcs_per_iteration', nan):>6.2f} "
            f"{r.get('forwards_per_iteration', nan):>6.2f} "
            f"{merging:>7.2f} {(f'{bpi:,.0f}' if bpi else '-'):>9} {rss:>18}"
        )
    lines.append("RPC latency p50 / p99 (ms), mean request + response bytes:")
    for r in doc["runs"]:
        for name, s in r.get("rpc_latency", {}).items():
            lines.append(
                f"  {r['mode']:<11} {r['policy']:<9} {name:<11} {s['calls']:>6} calls "
                f"{s['p50_ms']:>8.2f} / {s['p99_ms']:>8.2f}   "
                f"{s['mean_request_bytes']:>9,.0f} + {s['mean_response_bytes']:>9,.0f} B"
            )
    for r in doc["runs"]:
        wire = r.get("wire_bytes") or {}
        fit = wire.get("driver_bytes_fit")
        parts = []
        if "driver_per_plain_iteration" in wire:
            parts.append(f"plain {wire['driver_per_plain_iteration']:,.0f} B")
        if "driver_per_edited_iteration" in wire:
            parts.append(f"with a merge/eviction {wire['driver_per_edited_iteration']:,.0f} B")
        if fit:
            parts.append(
                f"fit {fit['fixed']:,.0f} B + {fit['per_row']:.1f} B/row over rows "
                f"{fit['rows_range'][0]}-{fit['rows_range'][1]}"
            )
        if parts:
            lines.append(f"  {r['mode']} {r['policy']}: driver bytes/iteration: {'; '.join(parts)}")
        hops = wire.get("per_hop")
        if hops:
            lines.append(
                f"  {r['mode']} {r['policy']}: bytes/iteration per hop: worker->driver "
                f"{hops['worker_to_driver']:,.0f} B, driver->authority "
                f"{hops['driver_to_authority']:,.0f} B, "
                f"authority->worker {hops['authority_to_worker']:,.0f} B"
            )
        follow = r.get("follow") or {}
        if follow.get("deltas"):
            lines.append(
                f"  {r['mode']} {r['policy']}: replica follow, mean per committed delta: apply "
                f"{follow.get('apply_mean_ms', nan):.2f} ms, commit -> applied "
                f"{follow.get('lag_mean_ms', nan):.2f} ms ({follow['deltas']} deltas)"
            )
        if "stopped" in r:
            lines.append(f"  {r['mode']} {r['policy']}: stopped {r['stopped']}")
    return "\n".join(lines)


def run_speed(args: argparse.Namespace) -> int:
    if not args.model and not args.shape:
        args.model = str(demo_model_dir())
    threads = args.threads or (1 if not args.shape else (os.cpu_count() or 1))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="positronic-speed-") as tmp:
        workdir = Path(tmp)
        model_dir = args.model
        if args.shape:
            print(f"building a random {args.shape}-shaped model in {tmp}", file=sys.stderr)
            model_dir = str(make_shape_model(args.shape, args.tokenizer, workdir / "model"))
        try:
            runs = plan_runs(args, model_dir, threads)
        except ValueError as e:
            print(f"positronic bench speed: {e}", file=sys.stderr)
            return 2
        results = []
        for run in tqdm(runs, desc="speed", unit="run", file=sys.stderr):
            results.append(measure(run, workdir))
    doc = {
        "model": args.model or f"random {args.shape} shape",
        "tokens": args.tokens,
        "budget": args.budget,
        "threads": threads,
        "device": args.device,
        "dtype": args.dtype,
        "prompt": PROMPT,
        "runs": with_ratios(results),
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    print(table(doc))
    print(f"({doc['elapsed_s']:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 1 if any("error" in r for r in results) else 0
