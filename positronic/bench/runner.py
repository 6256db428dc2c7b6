"""Teacher-forced runs of one policy over one stream through the real loop (services, patches
and all), and a process pool that runs many of them side by side.

Each pool process starts its own embedded authority + worker once (loopback gRPC, the same code
path as a split deployment) and runs jobs against them; progress (one tick per Step) goes back
to the parent through a queue so one progress bar can follow every process.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue as queue_module
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

from positronic.bench.specs import PolicySpec
from positronic.bench.wire import RecordingInterceptor, WireRecorder
from positronic.clients import Endpoints, MutationCounter
from positronic.loop import LoopConfig, run_loop
from positronic.rpc import open_channel
from positronic.v1 import (
    cache_authority_pb2,
    cache_authority_pb2_grpc,
    model_worker_pb2_grpc,
    session_pb2,
)


@dataclass(frozen=True)
class Job:
    spec: PolicySpec
    stream: int  # index of the stream
    token_ids: list[int]  # the whole stream, BOS first
    budget: int


@dataclass
class StreamRun:
    label: str
    stream: int
    nll: list[float]  # -log p of token_ids[2:]
    merges: int
    evictions: int
    max_rows: int
    tokens_per_s: float
    consistent: bool
    merge_positions: list[int] = field(default_factory=list)  # first row of every merged pair
    merged_kept_original: int = 0  # final mirror: merged rows whose token is one of the pair's
    merged_rows: int = 0  # final mirror: rows that are merges


def connect(authority: str, worker: str, on_step: Callable[[], None] | None) -> Endpoints:
    """Endpoints like Endpoints.connect, with a recorder on the worker channel for progress."""
    counter = MutationCounter()
    recorder = WireRecorder(on_step=on_step)
    a = open_channel(authority, interceptors=[counter])
    w = open_channel(worker, interceptors=[RecordingInterceptor(recorder)])
    return Endpoints(
        authority=cache_authority_pb2_grpc.CacheAuthorityStub(a),
        worker=model_worker_pb2_grpc.ModelWorkerStub(w),
        counter=counter,
        channels=[a, w],
    )


def run_job(endpoints: Endpoints, job: Job) -> StreamRun:
    """Prime BOS, feed token_ids[1], then force (and score) every later token."""
    policy = job.spec.make()
    positions: list[int] = []
    plan = policy.plan

    def recording_plan(scores, structural, excess):
        result = plan(scores, structural, excess)
        positions.extend(result.merges)
        return result

    policy.plan = recording_plan  # type: ignore[method-assign]
    config = LoopConfig(
        policy=policy,
        target_rows=job.budget,
        forced_tokens=list(job.token_ids[2:]),
        attention_reduction=job.spec.reduction,
        repair_candidates=job.spec.candidates,
        progress_every=0,
    )
    stats = run_loop(endpoints, "", config, lambda _: None, prompt_ids=list(job.token_ids[:2]))
    mirror = endpoints.authority.GetSession(
        cache_authority_pb2.GetSessionRequest(session_id=stats.session_id)
    ).mirror
    merged = [m for m in mirror if m.source == session_pb2.TOKEN_SOURCE_MERGED]
    endpoints.authority.DeleteSession(
        cache_authority_pb2.DeleteSessionRequest(session_id=stats.session_id)
    )
    return StreamRun(
        label=job.spec.label,
        stream=job.stream,
        nll=list(stats.nll),
        merges=stats.merges,
        evictions=stats.evictions,
        max_rows=stats.max_rows,
        tokens_per_s=stats.tokens_per_s,
        consistent=stats.consistent,
        merge_positions=positions,
        merged_kept_original=sum(m.token_id in m.replaced_token_ids for m in merged),
        merged_rows=len(merged),
    )


# -- the pool ------------------------------------------------------------------------------
# A pool initializer can hand state to later tasks only through the process's globals; this one
# dict, private to each pool process, holds its services and endpoints.
_PROCESS: dict = {}


def _init_process(model: str, threads: int, progress) -> None:
    import torch

    from positronic.embedded import embedded_services

    torch.set_num_threads(threads)
    stack = contextlib.ExitStack()
    addrs = stack.enter_context(embedded_services(model, device="cpu"))
    _PROCESS["stack"] = stack
    _PROCESS["endpoints"] = connect(addrs.authority, addrs.worker, lambda: progress.put(1))


def _run_in_process(job: Job) -> StreamRun:
    return run_job(_PROCESS["endpoints"], job)


@contextlib.contextmanager
def local_services(model: str, on_step: Callable[[], None] | None) -> Iterator[Endpoints]:
    """Embedded services in this process, for runs without a pool."""
    from positronic.embedded import embedded_services

    with embedded_services(model, device="cpu") as addrs:
        endpoints = connect(addrs.authority, addrs.worker, on_step)
        try:
            yield endpoints
        finally:
            endpoints.close()


def run_jobs(
    model: str,
    jobs: list[Job],
    *,
    processes: int,
    threads: int,
    on_step: Callable[[int], None],
) -> Iterable[StreamRun]:
    """Run every job; yields results as they finish. processes == 1 runs here, in order."""
    if processes <= 1:
        with local_services(model, lambda: on_step(1)) as endpoints:
            for job in jobs:
                yield run_job(endpoints, job)
        return
    ctx = mp.get_context("spawn")  # never fork a process that has started gRPC threads
    progress = ctx.Queue()
    stop = threading.Event()
    reader = threading.Thread(target=_forward_progress, args=(progress, on_step, stop), daemon=True)
    reader.start()
    try:
        with ProcessPoolExecutor(
            processes,
            mp_context=ctx,
            initializer=_init_process,
            initargs=(model, threads, progress),
        ) as pool:
            futures = [pool.submit(_run_in_process, j) for j in jobs]
            for future in as_completed(futures):
                yield future.result()
    finally:
        stop.set()
        reader.join(timeout=2.0)


def _forward_progress(queue, on_step: Callable[[int], None], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            on_step(queue.get(timeout=0.2))
        except queue_module.Empty:
            continue
