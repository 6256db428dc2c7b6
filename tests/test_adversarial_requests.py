"""Hostile requests to every authority RPC (issue 12, items 4 and 6): random bytes, hostile
numbers and shapes, huge strings. The answer is never INTERNAL or UNKNOWN, an error message
never quotes more than a bounded prefix of the input, and a refused request changes nothing."""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_authority.convert import geometry_to_pb
from positronic.limits import MAX_STATUS_MESSAGE_CHARS
from positronic.v1 import cache_authority_pb2 as ca
from positronic.v1 import session_pb2, tensor_pb2
from tests.authority_fixtures import (
    append_pb,
    create_request,
    patch_stream,
    primed,
    running_authority,
    stub,
    tiny_geometry,
)

C = grpc.StatusCode
NEVER = (C.INTERNAL, C.UNKNOWN)
SERVICE = "/positronic.v1.CacheAuthority/"
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def authority():
    with running_authority() as (server, channel):
        client = stub(channel)
        primed((server, client))
        yield server, channel, client


def snapshot(client) -> tuple:
    """Every session's id, version, digest and rows: what a refused request must not change."""
    out = []
    for s in client.ListSessions(ca.ListSessionsRequest(), timeout=30).sessions:
        got = client.GetSession(ca.GetSessionRequest(session_id=s.session_id), timeout=30)
        out.append((s.session_id, s.version, s.digest, tuple(e.token_id for e in got.mirror)))
    return tuple(out)


def refused(call) -> grpc.RpcError | None:
    """The error of call() (None when it succeeded), checked for the two promises."""
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() not in NEVER, (e.code(), e.details())
        assert len(e.details() or "") <= MAX_STATUS_MESSAGE_CHARS
        return e
    return None


# -- random bytes to every method --------------------------------------------------------------
def _raw_calls(channel, data: bytes):
    unary = ("CreateSession", "GetSession", "ListSessions", "DeleteSession")
    for name in unary:
        yield name, lambda n=name: channel.unary_unary(SERVICE + n)(data, timeout=5)
    for name in ("Sync", "Watch"):
        yield name, lambda n=name: next(iter(channel.unary_stream(SERVICE + n)(data, timeout=0.5)))
    yield "Patch", lambda: channel.stream_unary(SERVICE + "Patch")(iter([data, data]), timeout=5)


@FUZZ
@given(data=st.binary(min_size=1, max_size=300))
def test_random_bytes_to_every_method(authority, data):
    _, channel, client = authority
    before = snapshot(client)
    for name, call in _raw_calls(channel, data):
        try:
            call()
            changed = False
        except StopIteration:
            changed = False
        except grpc.RpcError as e:
            changed = False
            if e.code() == C.DEADLINE_EXCEEDED and name == "Watch":
                continue  # bytes that parse as a Watch of every session: it waits, as it should
            assert e.code() not in NEVER, (name, e.code(), e.details())
        if name in ("CreateSession", "DeleteSession"):
            changed = snapshot(client) != before
            if changed:  # random bytes that happen to be a valid request: clean up and go on
                for sid in {s[0] for s in snapshot(client)} - {s[0] for s in before}:
                    client.DeleteSession(ca.DeleteSessionRequest(session_id=sid))
        assert not changed or name == "CreateSession"
    assert snapshot(client) == before


# -- hostile numbers, shapes and strings in well-formed messages -------------------------------
ints = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 3, 4, 16, 2**31, 2**40, -(2**63)]),
)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
texts = st.text(max_size=40) | st.just("x" * 5000)


@st.composite
def tensors(draw):
    shape = draw(st.lists(ints, max_size=6) | st.just([2, 2, 1, 8]))
    dtype = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 99]))
    size = draw(st.sampled_from([0, 4, 128, 256, 255]))
    return tensor_pb2.Tensor(
        dtype=dtype, shape=shape, data=draw(st.binary(min_size=size, max_size=size))
    )


@st.composite
def ops(draw):
    kind = draw(st.sampled_from(["append", "replace_pair", "evict", "set_brightness", "empty"]))
    kv = tensor_pb2.KVBlock(keys=draw(tensors()), values=draw(tensors()))
    if kind == "append":
        return session_pb2.PatchOp(
            append=session_pb2.AppendOp(
                position=draw(ints),
                token_ids=draw(st.lists(ints, max_size=4)),
                kv=kv,
                pieces=draw(st.lists(texts, max_size=3)),
                brightness=draw(st.lists(floats, max_size=3)),
                source=draw(st.sampled_from([0, 1, 2, 3, 4, 77])),
            )
        )
    if kind == "replace_pair":
        return session_pb2.PatchOp(
            replace_pair=session_pb2.ReplacePairOp(
                position=draw(ints),
                expected_token_ids=draw(st.lists(ints, max_size=3)),
                token_id=draw(ints),
                kv=kv,
                piece=draw(texts),
                brightness=draw(floats),
                replaced_text=draw(texts),
            )
        )
    if kind == "evict":
        return session_pb2.PatchOp(
            evict=session_pb2.EvictOp(position=draw(ints), expected_token_id=draw(ints))
        )
    if kind == "set_brightness":
        return session_pb2.PatchOp(
            set_brightness=session_pb2.SetBrightnessOp(
                expected_row_count=draw(ints), brightness=draw(st.lists(floats, max_size=5))
            )
        )
    return session_pb2.PatchOp()


@FUZZ
@given(
    op_list=st.lists(ops(), max_size=4),
    version=ints,
    request_id=texts,
    session_id=st.sampled_from(["s", "zz", "", "../x", "s" * 20000]),
    per_message=st.integers(0, 2),
)
def test_hostile_patches(authority, op_list, version, request_id, session_id, per_message):
    _, _, client = authority
    before = snapshot(client)
    stream = patch_stream(session_id, version, request_id, op_list, per_message=per_message)
    error = refused(lambda: client.Patch(stream, timeout=30))
    if error is not None:
        assert snapshot(client) == before


@st.composite
def geometries(draw):
    g = geometry_to_pb(tiny_geometry())
    for field in (
        "num_layers",
        "num_kv_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
    ):
        if draw(st.booleans()):
            setattr(
                g,
                field,
                draw(ints)
                if field in ("vocab_size", "max_position_embeddings")
                else draw(st.integers(-(2**31), 2**31 - 1)),
            )
    if draw(st.booleans()):
        g.dtype = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 99]))
    if draw(st.booleans()):
        del g.rope.inv_freq[:]
        g.rope.inv_freq.extend(draw(st.lists(floats, max_size=6)))
    if draw(st.booleans()):
        g.rope.attention_scaling = draw(st.floats(allow_nan=True, allow_infinity=True))
    if draw(st.booleans()):
        g.model_fingerprint = draw(texts)
    return g


@FUZZ
@given(
    geometry=geometries(),
    target=ints,
    hard_max=ints,
    seed=st.none() | floats,
    session_id=st.sampled_from(["", "new", "s", "a" * 129, "x/y", "é"]),
)
def test_hostile_create_session(authority, geometry, target, hard_max, seed, session_id):
    _, _, client = authority
    before = snapshot(client)
    request = ca.CreateSessionRequest(
        session_id=session_id,
        geometry=geometry,
        budget=session_pb2.Budget(target_rows=target, hard_max_rows=hard_max),
    )
    if seed is not None:
        request.seed_brightness = seed
    error = refused(lambda: client.CreateSession(request, timeout=30))
    if error is None:  # a valid request after all: it made exactly one session
        made = client.ListSessions(ca.ListSessionsRequest()).sessions
        (new,) = {s.session_id for s in made} - {s[0] for s in before}
        client.DeleteSession(ca.DeleteSessionRequest(session_id=new))
        assert seed is None or (0 <= seed <= 1e9 and not math.isnan(seed))
    assert snapshot(client) == before


@FUZZ
@given(from_version=ints, max_chunk=ints, follow=st.booleans(), watch_from=st.none() | ints)
def test_hostile_sync_and_watch_numbers(authority, from_version, max_chunk, follow, watch_from):
    _, _, client = authority
    request = ca.SyncRequest(
        session_id="s", from_version=from_version, max_chunk_bytes=max_chunk, follow=follow
    )
    call = client.Sync(request, timeout=0.2)
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        assert e.code() not in NEVER, (e.code(), e.details())
    watch = ca.WatchRequest(session_id="s")
    if watch_from is not None:
        watch.from_version = watch_from
    try:
        next(client.Watch(watch, timeout=0.2))
    except grpc.RpcError as e:
        assert e.code() not in NEVER, (e.code(), e.details())
        if watch_from is not None and watch_from < 0:
            assert e.code() == C.INVALID_ARGUMENT


# -- huge strings: bounded echoes, never RESOURCE_EXHAUSTED from metadata -----------------------
HUGE = "Z" * 20_000


def _every_session_rpc(client, sid: str):
    yield "GetSession", lambda: client.GetSession(ca.GetSessionRequest(session_id=sid))
    yield "DeleteSession", lambda: client.DeleteSession(ca.DeleteSessionRequest(session_id=sid))
    yield "Sync", lambda: list(client.Sync(ca.SyncRequest(session_id=sid), timeout=5))
    yield "Watch", lambda: next(client.Watch(ca.WatchRequest(session_id=sid), timeout=5))
    yield "Patch", lambda: client.Patch(patch_stream(sid, 1, "", [append_pb(4, [1], 2)]))
    yield "CreateSession", lambda: client.CreateSession(create_request(sid))


@pytest.mark.parametrize("sid", [HUGE, "bad id " + HUGE, "\x00" * 5000])
def test_a_huge_or_malformed_session_id_is_invalid_with_a_short_message(authority, sid):
    _, _, client = authority
    before = snapshot(client)
    for name, call in _every_session_rpc(client, sid):
        error = refused(call)
        assert error is not None, name
        assert error.code() == C.INVALID_ARGUMENT, (name, error.code(), error.details()[:200])
        assert len(error.details()) < 300 and "..." in error.details(), name
    assert snapshot(client) == before


def test_huge_strings_in_other_fields_are_refused_with_short_messages(authority):
    _, _, client = authority
    before = snapshot(client)
    big_piece = append_pb(4, [1], 2)
    big_piece.append.pieces[0] = HUGE
    cases = [
        (
            C.INVALID_ARGUMENT,
            lambda: client.Patch(patch_stream("s", 1, HUGE, [append_pb(4, [1], 2)])),
        ),
        (C.RESOURCE_EXHAUSTED, lambda: client.Patch(patch_stream("s", 1, "", [big_piece]))),
    ]
    request = create_request("fp")
    request.geometry.model_fingerprint = HUGE
    cases.append((C.RESOURCE_EXHAUSTED, lambda: client.CreateSession(request)))
    for code, call in cases:
        error = refused(call)
        assert error is not None and error.code() == code, error and error.details()[:200]
        assert len(error.details()) < 300
    assert snapshot(client) == before


# -- auth ---------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(token=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=300))
def test_any_wrong_token_is_unauthenticated_everywhere_and_changes_nothing(token):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from positronic import rpc

    if token.strip() == "sesame":
        return
    with running_authority(auth_token="sesame") as (server, good):
        client = stub(good)
        primed((server, client))
        before = snapshot(client)
        hostile = rpc.open_channel(f"127.0.0.1:{server.port}", token or None)
        try:
            intruder = stub(hostile)
            calls = [call for _, call in _every_session_rpc(intruder, "s")]
            calls.append(lambda: intruder.ListSessions(ca.ListSessionsRequest()))
            for call in calls:
                error = refused(call)
                assert error is not None and error.code() == C.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(hostile)
            assert health.Check(health_pb2.HealthCheckRequest()).status == 1  # open to probes
        finally:
            hostile.close()
        assert snapshot(client) == before
