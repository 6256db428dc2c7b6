"""The loop end to end over real gRPC servers with the real stories260K model."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from cache_authority.server import AuthorityConfig, start_authority
from model_worker.server import WorkerConfig, start_worker
from positronic.clients import Endpoints, MutationCounter
from positronic.loop import LoopConfig, LoopConfigError, LoopError, run_loop
from positronic.policies import make_policy
from positronic.rpc import open_channel
from positronic.token_text import Utf8Assembler
from positronic.v1 import (
    cache_authority_pb2,
    cache_authority_pb2_grpc,
    model_worker_pb2,
    model_worker_pb2_grpc,
    session_pb2,
)
from tests.conftest import REPO
from tests.loop_fixtures import env

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def services(stories260k_dir):
    authority = start_authority(AuthorityConfig(listen="127.0.0.1:0"))
    address = f"127.0.0.1:{authority.port}"
    worker = start_worker(
        WorkerConfig(
            model=str(stories260k_dir), authority=address, listen="127.0.0.1:0", device="cpu"
        )
    )
    yield address, f"127.0.0.1:{worker.port}"
    worker.stop(grace=0.5)
    authority.stop(grace=0.5)


class Counted:
    """Endpoints whose authority channel also carries a test-owned counting interceptor,
    independent of the counter the driver reports from."""

    def __init__(self, services):
        authority, worker = services
        self.test_counter = MutationCounter()
        loop_counter = MutationCounter()
        a = open_channel(authority, interceptors=[self.test_counter, loop_counter])
        w = open_channel(worker)
        self.endpoints = Endpoints(
            authority=cache_authority_pb2_grpc.CacheAuthorityStub(a),
            worker=model_worker_pb2_grpc.ModelWorkerStub(w),
            counter=loop_counter,
            channels=[a, w],
        )


def generate(services, policy="halo-lm", tokens=120, target=24, seed=1, on_text=None, **kw):
    c = Counted(services)
    config = LoopConfig(
        policy=make_policy(policy, **kw.pop("policy_kw", {})),
        target_rows=target,
        max_new_tokens=tokens,
        seed=seed,
        **kw,
    )
    out: list[str] = []
    try:
        stats = run_loop(c.endpoints, PROMPT, config, on_text or out.append)
    finally:
        c.endpoints.close()
    return stats, "".join(out), c.test_counter.patch_calls


def mirror(services, session_id):
    channel = open_channel(services[0])
    try:
        stub = cache_authority_pb2_grpc.CacheAuthorityStub(channel)
        return stub.GetSession(cache_authority_pb2.GetSessionRequest(session_id=session_id))
    finally:
        channel.close()


def test_halo_loop_one_patch_per_iteration_bounded_and_consistent(services):
    stats, text, patches = generate(services, tokens=150, target=24)
    assert stats.tokens_generated == stats.iterations == 150
    assert patches == stats.mutating_rpcs == stats.iterations + 1  # plus the prime
    assert stats.max_rows <= stats.hard_max
    assert stats.merges > 0
    assert stats.consistent
    assert stats.final_version == stats.iterations + 1
    assert len(text.split()) > 20
    resp = mirror(services, stats.session_id)
    assert resp.session.row_count == len(resp.mirror) <= 24
    assert resp.mirror[0].source == session_pb2.TOKEN_SOURCE_STRUCTURAL
    assert resp.mirror[0].token_id == 1  # BOS, placed by the policy, never compacted
    merged = [m for m in resp.mirror if m.source == session_pb2.TOKEN_SOURCE_MERGED]
    assert all(len(m.replaced_token_ids) == 2 for m in merged)


def test_same_seed_same_stream(services):
    a = generate(services, tokens=60, target=20, seed=7)
    b = generate(services, tokens=60, target=20, seed=7)
    c = generate(services, tokens=60, target=20, seed=8)
    assert a[0].token_ids == b[0].token_ids and a[1] == b[1]
    assert a[0].token_ids != c[0].token_ids


@pytest.mark.parametrize("policy", ["streaming", "h2o", "tova"])
def test_eviction_policies_stay_within_budget(services, policy):
    stats, _, patches = generate(services, policy=policy, tokens=80, target=20)
    assert patches == stats.iterations + 1
    assert stats.max_rows <= 20 and stats.evictions > 0 and stats.merges == 0
    assert stats.consistent
    rows = mirror(services, stats.session_id).mirror
    assert rows[0].source == session_pb2.TOKEN_SOURCE_STRUCTURAL


def test_full_refuses_to_pass_its_limit(services):
    with pytest.raises(LoopError, match="full"):
        generate(services, policy="full", tokens=100, target=30, hard_max_rows=30)


def test_stale_version_is_reread_not_fatal(services):
    """Another writer commits between two iterations: the driver's patch is ABORTED, it
    re-reads the session and goes on."""
    channel = open_channel(services[0])
    stub = cache_authority_pb2_grpc.CacheAuthorityStub(channel)
    fired = threading.Event()
    state = {"calls": 0}

    def on_text(text: str) -> None:
        state["calls"] += 1
        if state["calls"] == 10 and not fired.is_set():
            fired.set()
            sessions = stub.ListSessions(cache_authority_pb2.ListSessionsRequest()).sessions
            s = max(sessions, key=lambda s: s.created_unix_ns)
            got = stub.GetSession(cache_authority_pb2.GetSessionRequest(session_id=s.session_id))
            op = session_pb2.PatchOp(
                set_brightness=session_pb2.SetBrightnessOp(
                    expected_row_count=got.session.row_count,
                    brightness=[m.brightness for m in got.mirror],
                )
            )
            stub.Patch(
                iter(
                    [
                        cache_authority_pb2.PatchRequest(
                            session_id=s.session_id,
                            expected_version=got.session.version,
                            request_id="intruder",
                            ops=[op],
                            end_of_patch=True,
                        )
                    ]
                )
            )

    stats, _, _ = generate(services, tokens=40, target=20, on_text=on_text)
    channel.close()
    assert fired.is_set()
    assert stats.stale_retries >= 1
    assert stats.iterations == 40 and stats.consistent


def test_a_recreated_session_id_is_not_served_from_the_old_replica(services):
    """Delete a session and create one with the same id: the worker must not compute on the
    replica of the deleted one (requests name the digest, the worker resyncs)."""
    channel = open_channel(services[0])
    stub = cache_authority_pb2_grpc.CacheAuthorityStub(channel)

    def run(prompt: str, session_id: str):
        c = Counted(services)
        config = LoopConfig(
            policy=make_policy("halo-lm"),
            target_rows=20,
            max_new_tokens=30,
            seed=11,
            session_id=session_id,
        )
        try:
            return run_loop(c.endpoints, prompt, config, lambda t: None)
        finally:
            c.endpoints.close()

    first = run("Once upon a time", "reused")
    stub.DeleteSession(cache_authority_pb2.DeleteSessionRequest(session_id="reused"))
    second = run("The cat sat down", "reused")
    fresh = run("The cat sat down", "fresh")
    channel.close()
    assert first.final_version == second.final_version  # same versions, other history
    assert second.token_ids == fresh.token_ids
    assert second.consistent


class CountingWorker:
    """The worker stub, with every call's method name recorded."""

    def __init__(self, stub):
        self._stub = stub
        self.calls: list[str] = []

    def __getattr__(self, name):
        method = getattr(self._stub, name)

        def call(*args, **kw):
            self.calls.append(name)
            return method(*args, **kw)

        return call


def test_one_tick_and_one_patch_per_iteration_and_the_text_is_exact(services):
    """The critical path is one Tick and one Patch per token: no Step, Repair, ComputeKV or
    Detokenize (the text comes with each Tick, as exact bytes). The printed text is exactly the
    text of the generated ids, and every mirror piece is the vocabulary piece."""
    c = Counted(services)
    worker = CountingWorker(c.endpoints.worker)
    c.endpoints.worker = worker  # type: ignore[assignment]
    out: list[str] = []
    config = LoopConfig(policy=make_policy("halo-lm"), target_rows=24, max_new_tokens=60, seed=3)
    try:
        stats = run_loop(c.endpoints, PROMPT, config, out.append)
        whole = c.endpoints.worker._stub.Detokenize(
            model_worker_pb2.DetokenizeRequest(ids=stats.token_ids, skip_special_tokens=True)
        )
        vocab = worker._stub.Detokenize(model_worker_pb2.DetokenizeRequest(ids=range(512))).pieces
    finally:
        c.endpoints.close()
    assert worker.calls == ["Info", "Tokenize", "Prefill"] + ["Tick"] * 60
    assert stats.rpcs_per_iteration == 2.0 and c.test_counter.patch_calls == 61
    assert stats.merges > 0 and stats.merging_iterations >= stats.merges
    assert stats.forwards_per_merging_iteration == 2.0  # halo-lm's lm repairer: one more pass
    assert "".join(out) == whole.text.replace("</s>", "\n\n")
    rows = mirror(services, stats.session_id).mirror
    assert [m.piece for m in rows] == [vocab[m.token_id] for m in rows]
    assert rows[1].piece == "▁Once" and rows[0].piece == "<s>"


def test_a_character_split_over_byte_tokens_prints_once_complete(services):
    """What the loop does with each Tick's next_token_bytes: a character split over byte
    tokens is printed once its last byte arrives."""
    channel = open_channel(services[1])
    stub = model_worker_pb2_grpc.ModelWorkerStub(channel)
    try:
        ids = stub.Tokenize(model_worker_pb2.TokenizeRequest(text="I like 🐱 cats")).ids
        chunks = stub.Detokenize(model_worker_pb2.DetokenizeRequest(ids=ids)).piece_bytes
    finally:
        channel.close()
    text = Utf8Assembler()
    assert [text.push(b) for b in chunks] == [
        " I",
        " li",
        "ke",
        " ",
        "",
        "",
        "",
        "🐱",
        " c",
        "at",
        "s",
    ]


@pytest.mark.parametrize("policy", ["halo", "streaming"])
def test_a_budget_past_the_models_positions_is_refused_before_anything_starts(services, policy):
    """stories260K has 512 positions; a compacting policy feeds tokens at row indices up to the
    hard maximum. Before: accepted, then a raw RESOURCE_EXHAUSTED a few hundred tokens in."""
    channel = open_channel(services[0])
    stub = cache_authority_pb2_grpc.CacheAuthorityStub(channel)
    listed = cache_authority_pb2.ListSessionsRequest()
    try:
        before = len(stub.ListSessions(listed).sessions)
        for target, hard in ((500, 0), (480, 512), (600, 700)):
            with pytest.raises(LoopConfigError, match="512 positions"):
                generate(services, policy=policy, tokens=600, target=target, hard_max_rows=hard)
        assert len(stub.ListSessions(listed).sessions) == before  # nothing was created
    finally:
        channel.close()
    stats, _, _ = generate(services, policy=policy, tokens=2, target=479)  # hard max 511: fits
    assert stats.iterations == 2


def test_generate_exits_2_with_one_line_for_a_budget_past_the_positions(services):
    authority, worker = services
    cmd = [sys.executable, "-m", "positronic.cli", "generate", "--prompt", PROMPT]
    cmd += ["--authority", authority, "--worker", worker, "--target-size", "500"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env(), timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if "positions" in line]
    assert len(lines) == 1 and "512 positions" in lines[0]
    assert done.stdout == ""
