"""Sync and Watch through a real server: deltas and snapshots reproduce the authority exactly,
a large prime streams in chunks, followers and watchers see commits; GetSession and metrics."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
import torch

from cache_authority.convert import geometry_to_pb
from cache_authority.sync import SyncReceiver
from positronic import codec
from positronic.rope import Rope
from positronic.v1 import cache_authority_pb2 as ca
from positronic.v1 import session_pb2, tensor_pb2
from tests.authority_fixtures import (
    VOCAB,
    append_pb,
    assert_same_state,
    create_request,
    evict_pb,
    patch_stream,
    primed,
    replace_pb,
    running_authority,
    stub,
    tiny_geometry,
    version_and_digest,
)

C = grpc.StatusCode


@pytest.fixture
def authority():
    with running_authority() as (server, channel):
        yield server, stub(channel)


def test_sync_deltas_and_snapshots_reproduce_the_authority(authority):
    server, client = primed(authority, tokens=tuple(range(10, 22)))
    engine = server.engine
    client.Patch(patch_stream("s", 1, "", [replace_pb(2, [12, 13], 40, 5), evict_pb(7, 17),
                                           append_pb(12, [41, 42], 6)]))  # fmt: skip
    replica = SyncReceiver()
    replica.receive_all(client.Sync(ca.SyncRequest(session_id="s", from_version=0)))
    assert_same_state(replica.state, engine._sessions["s"].state)
    for v in range(2, 5):
        rows = version_and_digest(client)[2]
        ops = [evict_pb(0, rows[0]), append_pb(len(rows), [v, v], v)]
        client.Patch(patch_stream("s", v, "", ops))
    messages = list(
        client.Sync(ca.SyncRequest(session_id="s", from_version=2, max_chunk_bytes=300))
    )
    assert all(m.WhichOneof("payload") == "delta" for m in messages)
    assert len(messages) > 3  # each version's ops were split, the digest on the final part
    replica.receive_all(messages)
    assert_same_state(replica.state, engine._sessions["s"].state)
    with pytest.raises(grpc.RpcError) as err:
        list(client.Sync(ca.SyncRequest(session_id="nope")))
    assert err.value.code() == C.NOT_FOUND


def collect(stream, into: list) -> None:
    """Read a streaming call into a list until the client cancels it."""
    try:
        for msg in stream:
            into.append(msg)
    except grpc.RpcError as e:
        assert e.code() == C.CANCELLED, e


def test_a_large_prime_streams_in_chunks_and_follow_sends_it_as_deltas(authority, monkeypatch):
    server, client = authority
    real_plan = server.engine.sync_plan

    def late_plan(*args, **kwargs):  # the follower's plans come late, as on a loaded machine
        time.sleep(0.3)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(server.engine, "sync_plan", late_plan)
    g = geometry_to_pb(tiny_geometry())
    g.num_kv_heads, g.head_dim = 4, 64
    g.rope.inv_freq[:] = Rope.from_theta(64).inv_freq.tolist()
    budget = session_pb2.Budget(target_rows=1600, hard_max_rows=1600)
    client.CreateSession(ca.CreateSessionRequest(session_id="big", geometry=g, budget=budget))
    row = 2 * 4 * 64 * 4  # bytes of one row's keys (and of its values), all layers
    ops = []
    for start in range(0, 1500, 256):  # each Append op carries 1 MiB of K/V
        n = min(256, 1500 - start)
        k = torch.randn(2, 4, n, 64)
        block = tensor_pb2.KVBlock(keys=codec.encode(k), values=codec.encode(k * 2))
        tokens = [(start + j) % VOCAB for j in range(n)]
        append = session_pb2.AppendOp(position=start, token_ids=tokens, kv=block)
        ops.append(session_pb2.PatchOp(append=append))
    received: list[ca.SyncResponse] = []
    follow = client.Sync(ca.SyncRequest(session_id="big", from_version=0, follow=True))
    reader = threading.Thread(target=collect, args=(follow, received))
    reader.start()
    # Patch only once the follower holds the v0 snapshot: a commit before its first plan would
    # make that plan a v1 snapshot, and the prime would never travel as deltas.
    for _ in range(400):
        if received:
            break
        time.sleep(0.05)
    assert received and received[0].snapshot_header.session.version == 0
    reply = client.Patch(patch_stream("big", 0, "prime", ops, per_message=2))
    assert (reply.version, reply.row_count) == (1, 1500)
    for _ in range(400):  # up to 20 s for the follower to see the prime's final part
        if received and received[-1].HasField("delta") and received[-1].delta.final:
            break
        time.sleep(0.05)
    follow.cancel()
    reader.join(10)
    replica = SyncReceiver()
    replica.receive_all(received)
    assert replica.state.version == 1 and replica.state.row_count == 1500
    deltas = [m for m in received if m.WhichOneof("payload") == "delta"]
    assert len(deltas) >= 3 and all(m.ByteSize() <= (2 << 20) + 4096 for m in deltas)
    snapshot = list(client.Sync(ca.SyncRequest(session_id="big", from_version=0)))
    assert all(len(m.snapshot_chunk.data) <= 2 << 20 for m in snapshot[1:]) and len(snapshot) >= 4
    assert snapshot[0].snapshot_header.total_bytes == 2 * 1500 * row


def test_watch_sees_commits_and_deletions(authority):
    _, client = primed(authority)
    client.Patch(patch_stream("s", 1, "w1", [evict_pb(0, 10)]))
    everything = client.Watch(ca.WatchRequest(), timeout=60)  # a missed event fails, not hangs
    backlog = client.Watch(ca.WatchRequest(session_id="s", from_version=1), timeout=60)
    for stream in (everything, backlog):
        stream.initial_metadata()  # the server sends it once the watch is subscribed
    client.Patch(patch_stream("s", 2, "w2", [evict_pb(0, 11)]))
    client.CreateSession(create_request("t"))
    client.Patch(patch_stream("t", 0, "w3", [append_pb(0, [1, 2], 3)]))
    client.DeleteSession(ca.DeleteSessionRequest(session_id="s"))
    seen = [next(everything) for _ in range(3)]
    assert [(e.session_id, e.version, e.request_id, e.deleted) for e in seen] == [
        ("s", 3, "w2", False),
        ("t", 1, "w3", False),
        ("s", 3, "", True),
    ]
    assert (seen[0].evicted, seen[0].row_count, seen[1].appended) == (1, 2, 2)
    # A watch of one session with from_version: the retained commit v2 first, then live ones;
    # the stream ends with the deletion.
    assert [(e.version, e.request_id, e.deleted) for e in backlog] == [
        (2, "w1", False),
        (3, "w2", False),
        (3, "", True),
    ]
    everything.cancel()
    with pytest.raises(grpc.RpcError) as err:
        client.GetSession(ca.GetSessionRequest(session_id="s"))
    assert err.value.code() == C.NOT_FOUND


def test_get_session_mirror_and_metrics():
    with running_authority(metrics_port=0) as (server, channel):
        client = stub(channel)
        primed((server, client))
        client.Patch(patch_stream("s", 1, "m", [replace_pb(1, [11, 12], 44, 3, brightness=7.5)]))
        got = client.GetSession(ca.GetSessionRequest(session_id="s"))
        merged = got.mirror[1]
        assert [e.position for e in got.mirror] == [0, 1, 2]
        assert (merged.token_id, merged.brightness, merged.source, merged.origin_position) == (
            44, 7.5, session_pb2.TOKEN_SOURCE_MERGED, 1)  # fmt: skip
        assert list(merged.replaced_token_ids) == [11, 12]
        assert list(merged.replaced_ledger_ids) == [1, 2] and merged.created_version == 2
        assert got.mirror[2].brightness == 255.0  # the seed brightness (0 in the request)
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert 'positronic_authority_session_rows{session_id="s"} 3.0' in text
        assert 'positronic_authority_patch_seconds_count{outcome="OK"} 2.0' in text
        assert "positronic_authority_bytes_in_total" in text
