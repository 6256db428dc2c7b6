"""The loop end to end over real gRPC servers with the real stories260K model."""

from __future__ import annotations

import threading

import pytest

from cache_authority.server import AuthorityConfig, start_authority
from model_worker.server import WorkerConfig, start_worker
from positronic.clients import Endpoints, MutationCounter
from positronic.loop import LoopConfig, LoopError, run_loop
from positronic.policies import make_policy
from positronic.rpc import open_channel
from positronic.v1 import (
    cache_authority_pb2,
    cache_authority_pb2_grpc,
    model_worker_pb2_grpc,
    session_pb2,
)

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
