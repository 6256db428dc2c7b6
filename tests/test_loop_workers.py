"""Several workers behind one driver: calls go round-robin over both, and when one is SIGKILLed
mid-generation the stream goes on, byte-identical, on the other (workers hold no state a retry
needs: every call names its session, version and digest)."""

from __future__ import annotations

import threading

from positronic.clients import Endpoints
from positronic.loop import LoopConfig, run_loop
from positronic.policies import make_policy
from tests.loop_fixtures import authority_process, worker_process

TOKENS = 80


def _run(authority: str, workers: str, on_text):
    endpoints = Endpoints.connect(authority, workers)
    config = LoopConfig(
        policy=make_policy("halo"),
        target_rows=24,
        max_new_tokens=TOKENS,
        seed=11,
        retry_timeout_s=60.0,
        progress_every=0,
    )
    try:
        return run_loop(endpoints, "Once upon a time", config, on_text)
    finally:
        endpoints.close()


def test_two_workers_survive_the_loss_of_one(stories260k_dir):
    authority = authority_process()
    doomed = survivor = None
    try:
        doomed = worker_process(stories260k_dir, authority.address)
        survivor = worker_process(stories260k_dir, authority.address)
        reference_text: list[str] = []
        reference = _run(authority.address, survivor.address, reference_text.append)

        text: list[str] = []
        halfway = threading.Event()

        def on_text(piece: str) -> None:
            text.append(piece)
            if len(text) == 20:
                halfway.set()

        result = {}
        both = f"{doomed.address},{survivor.address}"
        t = threading.Thread(
            target=lambda: result.update(stats=_run(authority.address, both, on_text))
        )
        t.start()
        assert halfway.wait(120)
        doomed.kill()  # SIGKILL in the middle of the generation
        t.join(300)
        assert not t.is_alive()
        stats = result["stats"]
        assert stats.iterations == TOKENS and stats.consistent
        assert stats.token_ids == reference.token_ids
        assert "".join(text) == "".join(reference_text)
        assert len("".join(text).split()) > 10
    finally:
        for w in (doomed, survivor):
            if w is not None:
                w.stop()
        authority.stop()


def test_a_list_of_addresses_is_one_round_robin_channel():
    from positronic import rpc
    from positronic.v1 import cache_authority_pb2 as ca
    from tests.authority_fixtures import create_request, running_authority, stub

    assert rpc.channel_target("127.0.0.1:1,127.0.0.1:2") == ("ipv4:127.0.0.1:1,127.0.0.1:2", None)
    assert rpc.channel_target("localhost:7,127.0.0.1:8")[1] == "localhost"
    assert rpc.channel_target("dns:///worker:50052") == ("dns:///worker:50052", None)
    with running_authority() as (a, ca_channel), running_authority() as (b, cb_channel):
        stub(ca_channel).CreateSession(create_request("on-a"))
        stub(cb_channel).CreateSession(create_request("on-b"))
        channel = rpc.open_channel(f"127.0.0.1:{a.port},127.0.0.1:{b.port}")
        try:
            seen = set()
            for _ in range(10):
                reply = stub(channel).ListSessions(ca.ListSessionsRequest(), timeout=10)
                seen |= {s.session_id for s in reply.sessions}
        finally:
            channel.close()
    assert seen == {"on-a", "on-b"}
