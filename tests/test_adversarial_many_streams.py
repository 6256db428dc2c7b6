"""Many open streams (issue 12, item 3): a thousand Watch streams and idle Patch streams hold no
thread, so health and Patch still answer; limits per client and per session answer
RESOURCE_EXHAUSTED with a message that says which limit.

Latency is measured and printed (`pytest -s`), never asserted beyond a bound that tells
"answered" from "starved" (a starved call waits for its whole deadline)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from positronic import rpc
from positronic.v1 import cache_authority_pb2 as ca
from tests.authority_fixtures import (
    create_request,
    evict_pb,
    patch_stream,
    primed,
    running_authority,
    stub,
)

C = grpc.StatusCode
WATCHERS = 1000
EVERY_SESSION = 64  # Watches of every session: the authority's default limit
IDLE_PATCHES = 20
STARVED_S = 5.0


def _idle_patch(release: threading.Event):
    def requests():
        yield next(patch_stream("s", 2, "", [evict_pb(0, 11)], end=False))
        release.wait(120)

    return requests()


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def test_a_thousand_watchers_and_idle_patches_do_not_starve_health_or_patch():
    with running_authority(max_streams_per_client=4096, max_streams_per_session=4096) as (
        server,
        channel,
    ):
        _, client = primed((server, stub(channel)))
        health = health_pb2_grpc.HealthStub(channel)

        def check() -> None:
            health.Check(health_pb2.HealthCheckRequest(), timeout=STARVED_S)

        base_health = min(_ms(check) for _ in range(5))
        base_patch = _ms(lambda: client.Patch(patch_stream("s", 1, "", [evict_pb(0, 10)])))
        address = f"127.0.0.1:{server.port}"
        channels = [rpc.open_channel(address) for _ in range(10)]
        release = threading.Event()
        try:
            watches = []
            for i in range(WATCHERS):
                request = ca.WatchRequest(session_id="" if i < EVERY_SESSION else "s")
                watches.append(stub(channels[i % 10]).Watch(request, timeout=120))
            for w in watches:
                w.initial_metadata()  # every one subscribed
            idle = [
                stub(channels[i % 10]).Patch.future(_idle_patch(release), timeout=120)
                for i in range(IDLE_PATCHES)
            ]
            deadline = time.monotonic() + 60
            while server.servicer.streams.open_count() < WATCHERS + IDLE_PATCHES:
                assert time.monotonic() < deadline, server.servicer.streams.open_count()
                time.sleep(0.05)

            health_ms = [_ms(check) for _ in range(5)]
            reply = {}

            def patch():
                reply["r"] = client.Patch(
                    patch_stream("s", 2, "busy", [evict_pb(0, 11)]), timeout=STARVED_S
                )

            patch_ms = _ms(patch)
            list_ms = _ms(lambda: client.ListSessions(ca.ListSessionsRequest(), timeout=STARVED_S))
            assert reply["r"].version == 3
            # Every watcher hears the commit.
            assert all(next(w).version == 3 for w in watches)
            print(
                f"\nno streams: health {base_health:.1f} ms, Patch {base_patch:.1f} ms; "
                f"{WATCHERS} Watch + {IDLE_PATCHES} idle Patch streams open: health "
                f"{min(health_ms):.1f}-{max(health_ms):.1f} ms, Patch {patch_ms:.1f} ms, "
                f"ListSessions right after {list_ms:.1f} ms"
            )
            for w in watches:
                w.cancel()
            release.set()
            for f in idle:
                with pytest.raises((grpc.RpcError, grpc.FutureCancelledError)):
                    f.result(timeout=30)
        finally:
            release.set()
            for c in channels:
                c.close()


def test_stream_limits_per_client_and_per_session_are_resource_exhausted():
    with running_authority(max_streams_per_client=3, max_streams_per_session=2) as (
        server,
        channel,
    ):
        _, client = primed((server, stub(channel)))
        client.CreateSession(create_request("t"))
        first = [client.Watch(ca.WatchRequest(session_id="s"), timeout=30) for _ in range(2)]
        for w in first:
            w.initial_metadata()
        with pytest.raises(grpc.RpcError) as err:
            next(client.Watch(ca.WatchRequest(session_id="s"), timeout=30))
        assert err.value.code() == C.RESOURCE_EXHAUSTED
        assert "limit per session" in err.value.details()
        third = client.Watch(ca.WatchRequest(session_id="t"), timeout=30)
        third.initial_metadata()
        with pytest.raises(grpc.RpcError) as err:  # a Patch stream counts too
            client.Patch(patch_stream("t", 0, "", [evict_pb(0, 1)]), timeout=30)
        assert err.value.code() == C.RESOURCE_EXHAUSTED
        assert "limit per client" in err.value.details()
        assert client.ListSessions(ca.ListSessionsRequest()).sessions  # unary calls still work
        first[0].cancel()
        deadline = time.monotonic() + 30
        while server.servicer.streams.open_count() > 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        again = client.Watch(ca.WatchRequest(session_id="s"), timeout=30)
        again.initial_metadata()  # a freed place is usable again
        for w in (first[1], third, again):
            w.cancel()


def test_watches_of_every_session_have_their_own_limit():
    """Each Watch of every session costs a message per commit of any session: their number is
    capped (RESOURCE_EXHAUSTED naming the limit), Watches of one session are not."""
    with running_authority(max_all_session_watches=2) as (server, channel):
        _, client = primed((server, stub(channel)))
        every = [client.Watch(ca.WatchRequest(), timeout=30) for _ in range(2)]
        for w in every:
            w.initial_metadata()
        with pytest.raises(grpc.RpcError) as err:
            next(client.Watch(ca.WatchRequest(), timeout=30))
        assert err.value.code() == C.RESOURCE_EXHAUSTED
        assert "Watches of every session" in err.value.details()
        one = client.Watch(ca.WatchRequest(session_id="s"), timeout=30)
        one.initial_metadata()  # a Watch of one session is still welcome
        every[0].cancel()
        deadline = time.monotonic() + 30
        while server.servicer.streams.open_count() > 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        again = client.Watch(ca.WatchRequest(), timeout=30)
        again.initial_metadata()  # a freed place is usable again
        for w in (every[1], one, again):
            w.cancel()
