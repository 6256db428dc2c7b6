"""One speed measurement, alone in its own process so that its peak memory is its own:

    python -m positronic.bench.speed_run RUN.json OUT.json

RUN.json: {"mode": "hf_generate" | "in_process" | "grpc_split", "policy", "model", "tokens",
"budget", "prompt", "device" (default cpu), "dtype" (default float32)}. OUT.json gets the
measurement (see `speed.py` for the fields).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from positronic.bench.processes import (
    follow_costs,
    free_port,
    peak_rss_bytes,
    scraped_follow_costs,
    service,
    sync_bytes,
    worker_sync_bytes,
)
from positronic.bench.wire import MeasuredStub, RecordingInterceptor, WireRecorder
from positronic.bench.wire_stats import (
    iteration_bytes,
    rate_by_tenth,
    rate_windows,
    summarize_latency,
)
from positronic.clients import PATCH_METHOD, Endpoints, MutationCounter

READY_TIMEOUT_S = 600.0  # a worker loading a 1.1B model on 2 cores takes a while


def positions_of(model_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 0)


# -- the baseline: Hugging Face generate with a growing DynamicCache --------------------------
def run_hf_generate(run: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria

    from positronic.special_tokens import encode_prompt

    device = run.get("device", "cpu")
    dtype = getattr(torch, run.get("dtype", "float32"))
    model = AutoModelForCausalLM.from_pretrained(run["model"], dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(run["model"])
    ids = encode_prompt(tok, run["prompt"]).ids
    limit = positions_of(run["model"]) - len(ids)
    n = min(run["tokens"], limit)
    stamps: list[float] = []

    class Clock(StoppingCriteria):
        """Called once per generated token: its time stamp, never a stop."""

        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with torch.inference_mode():
        model.generate(
            torch.tensor([ids], device=device),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            stopping_criteria=[Clock()],
            pad_token_id=tok.eos_token_id,
        )
    out = {
        "tokens_generated": len(stamps),
        "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "tokens_per_s_at": rate_windows(stamps),
        "tokens_per_s_by_tenth": rate_by_tenth(stamps),
        "peak_rss_bytes": {"process": peak_rss_bytes()},
    }
    if n < run["tokens"]:
        out["stopped"] = f"at {n} tokens: the model has {limit + len(ids)} positions"
    return out


# -- the loop, two ways ---------------------------------------------------------------------
def loop_config(run: dict, prompt_tokens: int):
    from positronic.loop import LoopConfig
    from positronic.policies import make_policy

    n, target, hard = run["tokens"], run["budget"], 0
    stopped = ""
    if run["policy"] == "full":  # no compaction: as many rows as the model has positions
        positions = positions_of(run["model"])
        target = hard = positions
        n = min(n, positions - prompt_tokens)
        if n < run["tokens"]:
            stopped = f"at {n} tokens: the model has {positions} positions"
    config = LoopConfig(
        policy=make_policy(run["policy"]),
        target_rows=target,
        hard_max_rows=hard,
        max_new_tokens=n,
        seed=0,
        temperature=0.8,
        progress_every=0,
    )
    return config, stopped


def drive(run: dict, endpoints: Endpoints, recorder: WireRecorder) -> dict:
    from transformers import AutoTokenizer

    from positronic.loop import run_loop
    from positronic.special_tokens import encode_prompt

    prompt_tokens = len(encode_prompt(AutoTokenizer.from_pretrained(run["model"]), run["prompt"]))
    config, stopped = loop_config(run, prompt_tokens)
    stats = run_loop(endpoints, run["prompt"], config, lambda _: None)
    out = {
        "tokens_generated": stats.tokens_generated,
        "tokens_per_s": stats.tokens_per_s,
        "tokens_per_s_at": rate_windows([it.end_s for it in recorder.iterations]),
        "tokens_per_s_by_tenth": rate_by_tenth([it.end_s for it in recorder.iterations]),
        "merges": stats.merges,
        "evictions": stats.evictions,
        "max_rows": stats.max_rows,
        "mutating_rpcs": stats.mutating_rpcs,
        "iterations": stats.iterations,
        "consistent": stats.consistent,
        "rpcs_per_iteration": stats.rpcs_per_iteration,
        "forwards_per_iteration": stats.forwards_per_iteration,
        "merging_iterations": stats.merging_iterations,
        "forwards_per_merging_iteration": stats.forwards_per_merging_iteration,
        "rpc_latency": summarize_latency(recorder.calls),
    }
    if stopped:
        out["stopped"] = stopped
    return out


def run_in_process(run: dict) -> dict:
    """Both servicers in this process, called directly (DirectStub): no serialization, no
    HTTP/2, no loopback — the sizes reported are what the messages would take on the wire."""
    from cache_authority.engine import Engine
    from cache_authority.metrics import Metrics
    from cache_authority.servicer import CacheAuthorityServicer
    from model_worker.server import WorkerConfig, start_worker
    from positronic.direct import DirectStub
    from positronic.v1 import cache_authority_pb2

    authority = CacheAuthorityServicer(Engine(None, None, Metrics()))
    sync_stub = DirectStub(authority)  # the authority's handlers are coroutines: its own loop

    class DirectSync:
        """The worker's Sync source, pulls and follow streams, without the wire."""

        def sync(self, session_id: str, from_version: int):
            return sync_stub.Sync(
                cache_authority_pb2.SyncRequest(session_id=session_id, from_version=from_version)
            )

        def follow(self, session_id: str, from_version: int):
            return sync_stub.Sync(
                cache_authority_pb2.SyncRequest(
                    session_id=session_id, from_version=from_version, follow=True
                )
            )

    worker = start_worker(
        WorkerConfig(
            model=run["model"],
            listen="127.0.0.1:0",
            device=run.get("device", "cpu"),
            dtype=run.get("dtype", "float32"),
        ),
        sync_source=DirectSync(),
    )
    try:
        recorder = WireRecorder()
        counter = MutationCounter()

        def count(name: str) -> None:
            if name == "Patch":
                counter._count(PATCH_METHOD)

        endpoints = Endpoints(
            authority=MeasuredStub(DirectStub(authority, on_call=count), recorder),  # type: ignore[arg-type]
            worker=MeasuredStub(DirectStub(worker.servicer), recorder),  # type: ignore[arg-type]
            counter=counter,
        )
        out = drive(run, endpoints, recorder)
        assert worker.servicer is not None
        synced = worker_sync_bytes(worker.servicer.metrics)
        follow = follow_costs(worker.servicer.metrics.registry.collect())
    finally:
        worker.stop(0.5)
        authority.close()
    out["wire_bytes"] = iteration_bytes(recorder.iterations, synced, recorder.calls)
    out["follow"] = follow
    out["peak_rss_bytes"] = {"process": peak_rss_bytes()}
    return out


def run_grpc_split(run: dict) -> dict:
    """Authority and worker as `positronic authority` / `positronic worker` processes; the
    driver (this process) talks to both over loopback gRPC."""
    from positronic.rpc import open_channel
    from positronic.v1 import cache_authority_pb2_grpc, model_worker_pb2_grpc

    with tempfile.TemporaryDirectory() as tmp:
        metrics_port = free_port()
        with (
            service(["authority", "--listen", "127.0.0.1:0"], Path(tmp, "a.log")) as (a, a_addr),
            service(
                [
                    "worker",
                    "--model",
                    run["model"],
                    "--authority",
                    a_addr,
                    "--listen",
                    "127.0.0.1:0",
                    "--device",
                    run.get("device", "cpu"),
                    "--dtype",
                    run.get("dtype", "float32"),
                    "--metrics-port",
                    str(metrics_port),
                ],
                Path(tmp, "w.log"),
            ) as (w, w_addr),
        ):
            recorder = WireRecorder()
            counter = MutationCounter()
            interceptor = RecordingInterceptor(recorder)
            ca = open_channel(a_addr, interceptors=[counter, interceptor])
            wc = open_channel(w_addr, interceptors=[interceptor])
            endpoints = Endpoints(
                authority=cache_authority_pb2_grpc.CacheAuthorityStub(ca),
                worker=model_worker_pb2_grpc.ModelWorkerStub(wc),
                counter=counter,
                channels=[ca, wc],
            )
            try:
                out = drive(run, endpoints, recorder)
            finally:
                endpoints.close()
            synced = sync_bytes(metrics_port)
            out["follow"] = scraped_follow_costs(metrics_port)
            out["wire_bytes"] = iteration_bytes(recorder.iterations, synced, recorder.calls)
            out["peak_rss_bytes"] = {
                "driver": peak_rss_bytes(),
                "authority": peak_rss_bytes(a.pid),
                "worker": peak_rss_bytes(w.pid),
            }
    return out


MODES = {"hf_generate": run_hf_generate, "in_process": run_in_process, "grpc_split": run_grpc_split}


def main(argv: list[str]) -> int:
    run = json.loads(Path(argv[0]).read_text())
    if threads := run.get("threads"):
        import torch

        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    out = MODES[run["mode"]](run)
    out = {"mode": run["mode"], "policy": run["policy"], **out}
    out["wall_s"] = time.perf_counter() - t0
    Path(argv[1]).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
