"""The authority through a real gRPC server on port 0: standard services, auth, the status of
every refusal (state unchanged after each), racing clients, Sync and Watch."""

from __future__ import annotations

import logging
import struct
import threading
import time
from unittest import mock

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from cache_authority import stage
from cache_authority.convert import geometry_to_pb
from positronic import rpc
from positronic.v1 import cache_authority_pb2 as ca
from positronic.v1 import session_pb2, tensor_pb2
from tests.authority_fixtures import (
    VOCAB,
    append_pb,
    create_request,
    evict_pb,
    kv_pb,
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


def test_health_serving_and_reflection_lists_the_service(authority):
    server, _ = authority
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "positronic.v1.CacheAuthority"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert (
        "positronic.v1.CacheAuthority" in ProtoReflectionDescriptorDatabase(channel).get_services()
    )


def test_missing_or_wrong_token_is_unauthenticated():
    with running_authority(auth_token="sesame") as (server, good):
        address = f"127.0.0.1:{server.port}"
        for channel in (rpc.open_channel(address), rpc.open_channel(address, "wrong")):
            with pytest.raises(grpc.RpcError) as err:
                stub(channel).ListSessions(ca.ListSessionsRequest())
            assert err.value.code() == C.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                stub(channel).Patch(patch_stream("s", 0, "", [evict_pb(0, 1)]))
            assert err.value.code() == C.UNAUTHENTICATED
        # Orchestrators probe health without the token.
        health = health_pb2_grpc.HealthStub(rpc.open_channel(address))
        assert health.Check(health_pb2.HealthCheckRequest()).status == 1  # SERVING
        created = stub(good).CreateSession(create_request(""))  # the authority picks the id
        listed = stub(good).ListSessions(ca.ListSessionsRequest()).sessions
        assert [s.session_id for s in listed] == [created.session.session_id]
        assert len(created.session.session_id) == 32 and created.session.version == 0


UNKNOWN = [
    ("GetSession", lambda c: c.GetSession(ca.GetSessionRequest(session_id="zz"))),
    ("DeleteSession", lambda c: c.DeleteSession(ca.DeleteSessionRequest(session_id="zz"))),
    ("Sync", lambda c: list(c.Sync(ca.SyncRequest(session_id="zz")))),
    ("Watch", lambda c: next(c.Watch(ca.WatchRequest(session_id="zz")))),
]


@pytest.mark.parametrize("call", [u[1] for u in UNKNOWN], ids=[u[0] for u in UNKNOWN])
def test_unknown_session_is_not_found(authority, call):
    with pytest.raises(grpc.RpcError) as err:
        call(authority[1])
    assert err.value.code() == C.NOT_FOUND


def test_negative_sync_arguments_are_invalid(authority):
    _, client = primed(authority)
    for request in (
        ca.SyncRequest(session_id="s", from_version=-1),
        ca.SyncRequest(session_id="s", max_chunk_bytes=-5),
    ):
        with pytest.raises(grpc.RpcError) as err:
            list(client.Sync(request))
        assert err.value.code() == C.INVALID_ARGUMENT


def _geometry(**changes):
    g = geometry_to_pb(tiny_geometry())
    for k, v in changes.items():
        setattr(g, k, v)
    return g


BAD_CREATES = [
    ("zero layers", dict(geometry=_geometry(num_layers=0)), C.INVALID_ARGUMENT),
    ("negative heads", dict(geometry=_geometry(num_kv_heads=-2)), C.INVALID_ARGUMENT),
    ("odd head dim", dict(geometry=_geometry(head_dim=7)), C.INVALID_ARGUMENT),
    ("inv_freq length", dict(geometry=_geometry(head_dim=16)), C.INVALID_ARGUMENT),
    ("unknown dtype", dict(geometry=_geometry(dtype=99)), C.INVALID_ARGUMENT),
    ("integer dtype", dict(geometry=_geometry(dtype=tensor_pb2.DTYPE_INT64)), C.INVALID_ARGUMENT),
    ("no vocabulary", dict(geometry=_geometry(vocab_size=0)), C.INVALID_ARGUMENT),
    ("no geometry", dict(geometry=session_pb2.ModelGeometry()), C.INVALID_ARGUMENT),
    ("target > hard", dict(budget=session_pb2.Budget(target_rows=9, hard_max_rows=8)),
     C.INVALID_ARGUMENT),
    ("no budget", dict(budget=session_pb2.Budget()), C.INVALID_ARGUMENT),
    ("path in id", dict(session_id="../etc"), C.INVALID_ARGUMENT),
    ("NaN seed", dict(seed_brightness=float("nan")), C.INVALID_ARGUMENT),
    ("too many rows", dict(budget=session_pb2.Budget(target_rows=1, hard_max_rows=10**12)),
     C.RESOURCE_EXHAUSTED),
    ("existing id", dict(session_id="taken"), C.ALREADY_EXISTS),
]  # fmt: skip


@pytest.mark.parametrize(
    "fields,code", [c[1:] for c in BAD_CREATES], ids=[c[0] for c in BAD_CREATES]
)
def test_bad_create_session_gets_its_status(authority, fields, code):
    _, client = authority
    client.CreateSession(create_request("taken"))
    request = create_request(fields.pop("session_id", "new"))
    for name, value in fields.items():
        if isinstance(value, str | float):
            setattr(request, name, value)
        else:
            getattr(request, name).CopyFrom(value)
    with pytest.raises(grpc.RpcError) as err:
        client.CreateSession(request)
    assert err.value.code() == code, err.value.details()
    listed = [s.session_id for s in client.ListSessions(ca.ListSessionsRequest()).sessions]
    assert listed == ["taken"]


def _kv_with(**tensor_changes):
    """A one-token KVBlock whose keys tensor is altered (dtype, shape or raw bytes)."""
    block = kv_pb(1, seed=9)
    for k, v in tensor_changes.items():
        if k == "shape":
            del block.keys.shape[:]
            block.keys.shape.extend(v)
        else:
            setattr(block.keys, k, v)
    return block


def _append_kv(block, token=5):
    return session_pb2.PatchOp(
        append=session_pb2.AppendOp(position=4, token_ids=[token], kv=block, pieces=["x"])
    )


_rng = torch.Generator().manual_seed(7)
_RANDOM = bytes(
    torch.randint(0, 256, (2 * 2 * 1 * 8 * 4,), generator=_rng, dtype=torch.uint8).tolist()
)
_NAN = struct.pack("<f", float("nan")) + _RANDOM[4:]

HOSTILE = [
    ("random bytes, wrong length", [_append_kv(_kv_with(data=_RANDOM[:-3]))], C.INVALID_ARGUMENT),
    ("random bytes with NaN", [_append_kv(_kv_with(data=_NAN))], C.INVALID_ARGUMENT),
    ("unknown wire dtype", [_append_kv(_kv_with(dtype=42))], C.INVALID_ARGUMENT),
    ("wrong dtype", [_append_kv(kv_pb(1, seed=9, dtype=torch.float16))], C.INVALID_ARGUMENT),
    ("wrong shape", [_append_kv(_kv_with(shape=[2, 2, 2, 4]))], C.INVALID_ARGUMENT),
    ("negative dim", [_append_kv(_kv_with(shape=[2, -2, 1, 8]))], C.INVALID_ARGUMENT),
    ("huge shape", [_append_kv(_kv_with(shape=[2**40, 2**20, 1, 8]))], C.INVALID_ARGUMENT),
    ("two tokens, one row of kv", [session_pb2.PatchOp(append=session_pb2.AppendOp(
        position=4, token_ids=[1, 2], kv=kv_pb(1, 9)))], C.INVALID_ARGUMENT),
    ("id >= vocabulary", [append_pb(4, [VOCAB], 9)], C.INVALID_ARGUMENT),
    ("negative id", [append_pb(4, [-7], 9)], C.INVALID_ARGUMENT),
    ("merge into a bad id", [replace_pb(0, [10, 11], 2**40, 9)], C.INVALID_ARGUMENT),
    ("negative position", [evict_pb(-1, 10)], C.INVALID_ARGUMENT),
    ("huge position", [evict_pb(2**62, 10)], C.INVALID_ARGUMENT),
    ("append far away", [append_pb(2**50, [1], 9)], C.FAILED_PRECONDITION),
    ("expected tokens not there", [replace_pb(1, [11, 99], 3, 9)], C.FAILED_PRECONDITION),
    ("beyond the hard max", [append_pb(4, list(range(13)), 9)], C.RESOURCE_EXHAUSTED),
    ("empty ops", [], C.INVALID_ARGUMENT),
    ("an empty op", [session_pb2.PatchOp()], C.INVALID_ARGUMENT),
    ("unknown source", [append_pb(4, [1], 9, source=77)], C.INVALID_ARGUMENT),
]  # fmt: skip


@pytest.mark.parametrize("ops,code", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_patch_gets_its_status_and_changes_nothing(authority, ops, code):
    _, client = primed(authority)
    before = version_and_digest(client)
    with pytest.raises(grpc.RpcError) as err:
        client.Patch(patch_stream("s", 1, "hostile", ops))
    assert err.value.code() == code, err.value.details()
    assert version_and_digest(client) == before
    # The request id was not burned by the refusal: a good patch under it commits.
    assert client.Patch(patch_stream("s", 1, "hostile", [evict_pb(0, 10)])).version == 2


STREAMS = [
    ("empty stream", lambda: iter([]), C.INVALID_ARGUMENT),
    ("no session id", lambda: patch_stream("", 1, "", [evict_pb(0, 10)]), C.INVALID_ARGUMENT),
    ("unknown session", lambda: patch_stream("zz", 1, "", [evict_pb(0, 10)]), C.NOT_FOUND),
    ("header changes midway", lambda: iter([
        ca.PatchRequest(session_id="s", expected_version=1, ops=[evict_pb(0, 10)]),
        ca.PatchRequest(session_id="s", expected_version=2, ops=[evict_pb(1, 11)])]),
     C.INVALID_ARGUMENT),
    ("more bytes than the session can hold", lambda: patch_stream(
        "s", 1, "", [append_pb(4, [1] * 12, 9)] * 40, per_message=1), C.RESOURCE_EXHAUSTED),
]  # fmt: skip


@pytest.mark.parametrize("make,code", [c[1:] for c in STREAMS], ids=[c[0] for c in STREAMS])
def test_malformed_patch_streams(authority, make, code):
    _, client = primed(authority)
    before = version_and_digest(client)
    with pytest.raises(grpc.RpcError) as err:
        client.Patch(make())
    assert err.value.code() == code, err.value.details()
    assert version_and_digest(client) == before


def test_a_message_over_the_grpc_limit_is_resource_exhausted(authority):
    server, client = primed(authority)
    big = grpc.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", 100 << 20)]
    )
    huge = tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1], data=b"\0" * (rpc.MAX_MESSAGE_BYTES + 1)
    )
    append = session_pb2.AppendOp(position=4, token_ids=[1], kv=tensor_pb2.KVBlock(keys=huge))
    op = session_pb2.PatchOp(append=append)
    before = version_and_digest(client)
    with pytest.raises(grpc.RpcError) as err:
        stub(big).Patch(patch_stream("s", 1, "", [op]))
    assert err.value.code() == C.RESOURCE_EXHAUSTED
    assert version_and_digest(client) == before


def test_stale_version_is_aborted_with_a_version_conflict_detail(authority):
    _, client = primed(authority)
    with pytest.raises(grpc.RpcError) as err:
        client.Patch(patch_stream("s", 0, "late", [evict_pb(0, 10)]))
    assert err.value.code() == C.ABORTED and "version 1" in err.value.details()
    (detail,) = rpc.status_details(err.value)
    conflict = ca.VersionConflict()
    assert detail.Unpack(conflict)
    assert (conflict.current_version, conflict.expected_version) == (1, 0)


def test_a_bug_is_internal_never_unknown_and_changes_nothing(authority, monkeypatch):
    _, client = primed(authority)
    before = version_and_digest(client)

    def broken(state):
        raise RuntimeError("a bug")

    monkeypatch.setattr(stage, "check_blades", broken)
    with pytest.raises(grpc.RpcError) as err:
        client.Patch(patch_stream("s", 1, "", [evict_pb(0, 10)]))
    assert err.value.code() == C.INTERNAL
    monkeypatch.undo()
    assert version_and_digest(client) == before


def test_a_client_that_cancels_mid_stream_commits_nothing_and_is_no_bug(
    authority, monkeypatch, caplog
):
    server, client = primed(authority)
    before = version_and_digest(client)
    caplog.set_level(logging.DEBUG, logger="cache_authority.servicer")
    arrived, release = threading.Event(), threading.Event()
    real_limit = server.engine.patch_byte_limit

    def limit_then_signal(session_id):  # the server has read the first message
        arrived.set()
        return real_limit(session_id)

    monkeypatch.setattr(server.engine, "patch_byte_limit", limit_then_signal)

    def requests():
        yield next(patch_stream("s", 1, "gone", [evict_pb(0, 10)], end=False))
        release.wait(30)  # the rest of the stream never comes

    call = client.Patch.future(requests())
    try:
        assert arrived.wait(30)
        call.cancel()
        deadline = time.monotonic() + 30
        while server.servicer.streams.open_count():
            assert time.monotonic() < deadline, "the server never finished the cancelled Patch"
            time.sleep(0.02)
    finally:
        release.set()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert version_and_digest(client) == before


def test_retry_with_the_same_request_id_is_replayed(authority):
    _, client = primed(authority)
    first = client.Patch(patch_stream("s", 1, "tick-1", [evict_pb(0, 10)]))
    again = client.Patch(patch_stream("s", 1, "tick-1", [evict_pb(0, 10)]))
    assert again.replayed and (again.version, again.digest) == (first.version, first.digest)
    assert version_and_digest(client)[2] == [11, 12, 13]


def test_eight_racing_clients_one_success_per_version(authority):
    server, client = authority
    client.CreateSession(create_request("race", hard_max=64))
    rounds, threads = 12, 8
    barrier = threading.Barrier(threads, timeout=60)  # a stuck racer fails the test, not hangs it
    outcomes: dict[int, list] = {r: [] for r in range(rounds)}
    errors: list[BaseException] = []

    def race(i: int) -> None:
        channel = rpc.open_channel(f"127.0.0.1:{server.port}")
        mine = stub(channel)
        try:
            for r in range(rounds):
                barrier.wait()
                ops = [append_pb(r, [i], seed=100 * r + i)]
                try:
                    reply = mine.Patch(patch_stream("race", r, f"{i}-{r}", ops), timeout=60)
                    outcomes[r].append(("OK", reply.version, i))
                except grpc.RpcError as e:
                    conflict = ca.VersionConflict()
                    rpc.status_details(e)[0].Unpack(conflict)
                    outcomes[r].append((e.code().name, conflict.current_version, i))
                barrier.wait()  # nobody starts the next round before every reply is in
        finally:
            channel.close()

    def racer(i: int) -> None:
        try:
            race(i)
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)
            barrier.abort()  # the others stop waiting for this one

    pool = [threading.Thread(target=racer, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    deadline = time.monotonic() + 120
    for t in pool:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in pool), "a racer is stuck"
    if errors:  # the racer that failed, not the others whose barrier it broke
        broken = threading.BrokenBarrierError
        raise next((e for e in errors if not isinstance(e, broken)), errors[0])
    winners = []
    for r in range(rounds):
        codes = sorted(o[0] for o in outcomes[r])
        assert codes == ["ABORTED"] * 7 + ["OK"], (r, outcomes[r])
        assert {o[1] for o in outcomes[r]} == {r + 1}  # the winner's version, the losers' current
        winners += [o[2] for o in outcomes[r] if o[0] == "OK"]
    assert version_and_digest(client, "race")[2] == winners


@pytest.mark.parametrize("with_disk", [False, True], ids=["in memory", "data dir"])
def test_a_small_patch_commits_on_the_event_loop_unless_it_writes_to_disk(tmp_path, with_disk):
    """No pool hop for a per-token patch of an in-memory authority (nothing to wait for); with
    a data directory the write-ahead log's write and fsync stay off the loop."""
    from cache_authority.engine import Engine

    threads: list[str] = []
    real = Engine._patch

    def recording(self, *args):
        threads.append(threading.current_thread().name)
        return real(self, *args)

    config = {"data_dir": str(tmp_path)} if with_disk else {}
    with (
        mock.patch.object(Engine, "_patch", recording),
        running_authority(**config) as (_, channel),
    ):
        client = stub(channel)
        client.CreateSession(create_request("s"))
        client.Patch(patch_stream("s", 0, "r", [append_pb(0, [1, 2], seed=1)]))
    assert len(threads) == 1
    assert threads[0].startswith("authority-engine") == with_disk
