"""The authority's contract details (issue 12): request ids bound to their patch, the version
conflict detail, seed brightness, brightness bounds, Watch's from_version, create cleanup."""

from __future__ import annotations

import grpc
import pytest

from cache_authority import persistence
from cache_authority.server import AuthorityConfig, start_authority
from positronic import rpc
from positronic.limits import MAX_BRIGHTNESS
from positronic.v1 import cache_authority_pb2 as ca
from tests.authority_fixtures import (
    append_pb,
    brightness_pb,
    create_request,
    evict_pb,
    patch_stream,
    primed,
    running_authority,
    stub,
    version_and_digest,
)

C = grpc.StatusCode


@pytest.fixture
def authority():
    with running_authority() as (server, channel):
        yield server, stub(channel)


def test_a_reused_request_id_with_another_patch_is_refused(authority):
    _, client = primed(authority)
    first = client.Patch(patch_stream("s", 1, "tick-1", [evict_pb(0, 10)]))
    before = version_and_digest(client)
    for ops, version in (([evict_pb(0, 11)], 2), ([evict_pb(0, 10)], 2), ([evict_pb(1, 11)], 1)):
        with pytest.raises(grpc.RpcError) as err:
            client.Patch(patch_stream("s", version, "tick-1", ops))
        assert err.value.code() == C.ALREADY_EXISTS, err.value.details()
        assert "tick-1" in err.value.details()
    assert version_and_digest(client) == before
    again = client.Patch(patch_stream("s", 1, "tick-1", [evict_pb(0, 10)]))  # a true retry
    assert again.replayed and again.digest == first.digest


@pytest.mark.parametrize("snapshot_every", [1, 1000], ids=["from snapshot", "from log"])
def test_request_ids_stay_bound_to_their_patch_across_a_restart(tmp_path, snapshot_every):
    config = AuthorityConfig(
        listen="127.0.0.1:0", data_dir=str(tmp_path), snapshot_every=snapshot_every, grace_s=0
    )
    server = start_authority(config)
    channel = rpc.open_channel(f"127.0.0.1:{server.port}")
    primed((server, stub(channel)))
    first = stub(channel).Patch(patch_stream("s", 1, "tick-1", [evict_pb(0, 10)]))
    channel.close()
    server.stop(0)
    server = start_authority(config)
    channel = rpc.open_channel(f"127.0.0.1:{server.port}")
    try:
        client = stub(channel)
        with pytest.raises(grpc.RpcError) as err:
            client.Patch(patch_stream("s", 1, "tick-1", [evict_pb(0, 11)]))
        assert err.value.code() == C.ALREADY_EXISTS
        again = client.Patch(patch_stream("s", 1, "tick-1", [evict_pb(0, 10)]))
        assert again.replayed and again.digest == first.digest
    finally:
        channel.close()
        server.stop(0)


@pytest.mark.parametrize("request_id", ["x" * 129, "a b", "ü", "tick/1"])
def test_malformed_request_ids_are_invalid(authority, request_id):
    _, client = primed(authority)
    with pytest.raises(grpc.RpcError) as err:
        client.Patch(patch_stream("s", 1, request_id, [evict_pb(0, 10)]))
    assert err.value.code() == C.INVALID_ARGUMENT
    assert len(err.value.details()) < 200


def test_every_aborted_patch_names_both_versions(authority):
    _, client = primed(authority)
    client.Patch(patch_stream("s", 1, "", [evict_pb(0, 10)]))
    for stale in (0, 1, 7):
        with pytest.raises(grpc.RpcError) as err:
            client.Patch(patch_stream("s", stale, "", [evict_pb(0, 11)]))
        assert err.value.code() == C.ABORTED
        (detail,) = rpc.status_details(err.value)
        conflict = ca.VersionConflict()
        assert detail.Unpack(conflict)
        assert (conflict.current_version, conflict.expected_version) == (2, stale)


def test_seed_brightness_unset_is_255_and_zero_is_zero(authority):
    _, client = authority
    client.CreateSession(create_request("unset"))
    client.CreateSession(create_request("zero", seed_brightness=0.0))
    for sid, seed in (("unset", 255.0), ("zero", 0.0)):
        client.Patch(patch_stream(sid, 0, "", [append_pb(0, [1, 2], 3)]))
        got = client.GetSession(ca.GetSessionRequest(session_id=sid))
        assert got.session.seed_brightness == seed
        assert [e.brightness for e in got.mirror] == [seed, seed]


@pytest.mark.parametrize("value", [-5.0, 1e30, float("inf"), float("nan"), -0.001])
def test_brightness_outside_its_bounds_is_refused_everywhere(authority, value):
    _, client = primed(authority)
    before = version_and_digest(client)
    attempts = [
        [brightness_pb([value, 1.0, 1.0, 1.0])],
        [append_pb(4, [1], 9, brightness=[value])],
    ]
    for ops in attempts:
        with pytest.raises(grpc.RpcError) as err:
            client.Patch(patch_stream("s", 1, "", ops))
        assert err.value.code() == C.INVALID_ARGUMENT, err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.CreateSession(create_request("other", seed_brightness=value))
    assert err.value.code() == C.INVALID_ARGUMENT
    assert version_and_digest(client) == before
    client.Patch(patch_stream("s", 1, "", [brightness_pb([0.0, 255.0, MAX_BRIGHTNESS, 3.0])]))


def test_watch_from_version_unset_zero_and_later(authority):
    _, client = primed(authority)
    client.Patch(patch_stream("s", 1, "", [evict_pb(0, 10)]))
    new_only = client.Watch(ca.WatchRequest(session_id="s"), timeout=30)
    everything = client.Watch(ca.WatchRequest(session_id="s", from_version=0), timeout=30)
    after_one = client.Watch(ca.WatchRequest(session_id="s", from_version=1), timeout=30)
    for call in (new_only, everything, after_one):
        call.initial_metadata()  # the server sends it once the subscription is in place
    client.Patch(patch_stream("s", 2, "", [evict_pb(0, 11)]))
    assert next(new_only).version == 3
    assert [next(everything).version for _ in range(3)] == [1, 2, 3]
    assert [next(after_one).version for _ in range(2)] == [2, 3]
    for call in (new_only, everything, after_one):
        call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        next(client.Watch(ca.WatchRequest(session_id="s", from_version=-1)))
    assert err.value.code() == C.INVALID_ARGUMENT


def test_watch_from_a_future_version_delivers_only_later_versions(authority):
    """The session is at version 2; a Watch from version 4 (of the session, or of every session)
    sees 5 first, never 3 or 4 (attack report F5)."""
    _, client = primed(authority)
    client.Patch(patch_stream("s", 1, "", [evict_pb(0, 10)]))
    one = client.Watch(ca.WatchRequest(session_id="s", from_version=4), timeout=30)
    every = client.Watch(ca.WatchRequest(from_version=4), timeout=30)
    for call in (one, every):
        call.initial_metadata()
    for version in (2, 3, 4):
        client.Patch(patch_stream("s", version, "", [evict_pb(0, 9 + version)]))
    assert next(one).version == 5
    first = next(every)
    assert (first.session_id, first.version) == ("s", 5)
    for call in (one, every):
        call.cancel()


@pytest.mark.parametrize("theta", [float("nan"), float("inf"), -float("inf"), -1.0])
def test_a_rope_theta_that_is_not_a_finite_non_negative_number_is_refused(authority, theta):
    """rope_theta is for display, but NaN, inf or a negative base is no model's (F9)."""
    _, client = authority
    request = create_request("bad")
    request.geometry.rope.rope_theta = theta
    with pytest.raises(grpc.RpcError) as err:
        client.CreateSession(request)
    assert err.value.code() == C.INVALID_ARGUMENT
    assert "rope_theta" in err.value.details()
    assert not client.ListSessions(ca.ListSessionsRequest()).sessions


def test_a_create_that_fails_after_its_folder_appeared_leaves_nothing(tmp_path, monkeypatch):
    config = AuthorityConfig(listen="127.0.0.1:0", data_dir=str(tmp_path), grace_s=0)
    server = start_authority(config)
    channel = rpc.open_channel(f"127.0.0.1:{server.port}")
    real_open = persistence.SessionStore._open_wal

    def fail_for_doomed(self, session_id, base_version):
        if session_id == "doomed":
            raise OSError(5, "injected failure after the rename")
        return real_open(self, session_id, base_version)

    monkeypatch.setattr(persistence.SessionStore, "_open_wal", fail_for_doomed)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub(channel).CreateSession(create_request("doomed"))
        assert err.value.code() == C.UNAVAILABLE
        stub(channel).CreateSession(create_request("fine"))
    finally:
        channel.close()
        server.stop(0)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "sessions").iterdir()) == ["fine"]
    server = start_authority(config)
    channel = rpc.open_channel(f"127.0.0.1:{server.port}")
    try:
        listed = stub(channel).ListSessions(ca.ListSessionsRequest()).sessions
        assert [s.session_id for s in listed] == ["fine"]
    finally:
        channel.close()
        server.stop(0)
