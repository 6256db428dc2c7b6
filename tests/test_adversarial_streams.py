"""Broken Patch streams against a real authority process (issue 12, item 1): a prime cut off at
every point, cancelled, left to its deadline, abandoned by a client process that exits, or
half-closed without end_of_patch, commits nothing — GetSession stays at the old version and rows.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import grpc
import pytest

from positronic import rpc
from positronic.v1 import cache_authority_pb2 as ca
from tests.authority_fixtures import (
    REPO,
    AuthorityProcess,
    append_pb,
    create_request,
    patch_stream,
    stub,
    version_and_digest,
)

C = grpc.StatusCode
ATTEMPTS = 25  # per way of breaking a stream: 100 in all


@pytest.fixture(scope="module")
def authority():
    process = AuthorityProcess()
    channel = rpc.open_channel(process.address)
    client = stub(channel)
    client.CreateSession(create_request("s", hard_max=16))
    try:
        yield process, client
    finally:
        channel.close()
        process.terminate()


def prime_messages(end: bool = True) -> list[ca.PatchRequest]:
    """A two-message prime of 2 + 2 tokens at version 0 (the issue's reproduction)."""
    ops = [append_pb(0, [10, 11], seed=1), append_pb(2, [12, 13], seed=2)]
    return list(patch_stream("s", 0, "", ops, per_message=1, end=end))


def _unchanged(client) -> None:
    assert version_and_digest(client)[0] == 0 and version_and_digest(client)[2] == []


def _first_then_wait(release: threading.Event):
    def requests():
        yield prime_messages()[0]
        release.wait(30)  # the second message never comes

    return requests()


def test_cancel_after_the_first_message_commits_nothing(authority):
    _, client = authority
    for _ in range(ATTEMPTS):
        release = threading.Event()
        call = client.Patch.future(_first_then_wait(release))
        time.sleep(0.02)  # let the first message reach the server
        call.cancel()
        release.set()
        with pytest.raises(grpc.FutureCancelledError):
            call.result()
        _unchanged(client)


def test_a_deadline_that_passes_mid_stream_commits_nothing(authority):
    _, client = authority
    for _ in range(ATTEMPTS):
        release = threading.Event()
        with pytest.raises(grpc.RpcError) as err:
            client.Patch(_first_then_wait(release), timeout=0.2)
        release.set()
        assert err.value.code() == C.DEADLINE_EXCEEDED
        _unchanged(client)


def test_half_close_without_end_of_patch_commits_nothing_at_every_cut(authority):
    _, client = authority
    ops = [append_pb(i, [10 + i], seed=i) for i in range(4)]
    cuts = list(range(1, 5)) * ((ATTEMPTS + 3) // 4)
    for cut in cuts[:ATTEMPTS]:
        messages = list(patch_stream("s", 0, "", ops, per_message=1, end=False))[:cut]
        with pytest.raises(grpc.RpcError) as err:
            client.Patch(iter(messages), timeout=30)
        assert err.value.code() == C.INVALID_ARGUMENT
        assert "end_of_patch" in err.value.details()
        _unchanged(client)


CLIENT = textwrap.dedent(
    """
    import os, sys, time
    from positronic import rpc
    from positronic.v1 import cache_authority_pb2, cache_authority_pb2_grpc

    first = cache_authority_pb2.PatchRequest.FromString(sys.stdin.buffer.read())
    channel = rpc.open_channel(sys.argv[1])
    stub = cache_authority_pb2_grpc.CacheAuthorityStub(channel)

    def requests():
        yield first
        time.sleep(60)

    calls = [stub.Patch.future(requests()) for _ in range(int(sys.argv[2]))]
    time.sleep(0.5)  # the first messages are on the wire
    print("sent", flush=True)
    os._exit(0)  # no cancel, no goodbye: the process is simply gone
    """
)


def test_a_client_process_that_exits_mid_stream_commits_nothing(authority):
    process, client = authority
    per_process = 5
    first = prime_messages()[0].SerializeToString()
    for _ in range(ATTEMPTS // per_process):
        r = subprocess.run(
            [sys.executable, "-c", CLIENT, process.address, str(per_process)],
            cwd=REPO,
            input=first,
            capture_output=True,
            timeout=60,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
        assert r.stdout.strip() == b"sent", r.stderr[-2000:]
        _unchanged(client)
    time.sleep(0.5)  # the server has seen every connection drop
    _unchanged(client)


def test_the_whole_prime_with_its_marker_commits_once(authority):
    """The control: the same messages with end_of_patch commit (in a session of their own)."""
    _, client = authority
    client.CreateSession(create_request("control", hard_max=16))
    messages = prime_messages()
    for m in messages[:1]:
        m.session_id = "control"
    reply = client.Patch(iter(messages), timeout=30)
    assert (reply.version, reply.row_count) == (1, 4)
    assert version_and_digest(client, "control")[2] == [10, 11, 12, 13]
