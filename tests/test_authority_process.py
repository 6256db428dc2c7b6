"""`positronic authority` as a real process: SIGKILL in the middle of a stream of patches, then a
restart on the same data dir serves every acknowledged version exactly, nothing half-applied."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from cache_authority.rows import SessionState
from cache_authority.sync import SyncReceiver
from positronic import rpc
from positronic.v1 import cache_authority_pb2 as ca
from tests.authority_fixtures import (
    VOCAB,
    AuthorityProcess,
    Reference,
    append_pb,
    assert_same_state,
    brightness_pb,
    create_request,
    evict_pb,
    patch_stream,
    replace_pb,
    stub,
)

pytestmark = pytest.mark.slow
HARD = 24


def tick_ops(state: SessionState, v: int) -> list:
    """One loop iteration's patch: brightness now and then, a merge and an eviction once the
    cache is full enough, and always an append."""
    n, tokens = state.row_count, state.live_token_ids()
    if n == 0:
        return [append_pb(0, [1, 2, 3, 4, 5, 6], seed=v)]
    ops = []
    if v % 3 == 0:
        ops.append(brightness_pb([float((v + i) % 255) for i in range(n)]))
    if n >= 12:
        ops.append(replace_pb(2, tokens[2:4], (7 * v) % VOCAB, seed=v))
        ops.append(evict_pb(n - 3, tokens[n - 3]))
    ops.append(append_pb(n, [v % VOCAB, (v + 1) % VOCAB], seed=1000 + v))
    return ops


@pytest.mark.parametrize("durability", ["fsync", "batch", "none"])
def test_sigkill_mid_stream_then_restart_keeps_every_acknowledged_version(tmp_path, durability):
    """Every durability setting survives a crash of the authority process (batch and none
    only give up patches on a crash of the machine)."""
    data_dir = str(tmp_path / "data")
    first = AuthorityProcess(
        "--data-dir", data_dir, "--snapshot-every", "7", "--durability", durability
    )
    client = stub(rpc.open_channel(first.address))
    client.CreateSession(create_request("s", hard_max=HARD))
    reference = Reference("s", HARD)  # the client's own replay of what it was told committed
    acked: list[tuple[int, bytes]] = []
    in_flight: list[list] = []
    killed = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        v = 0
        while True:
            ops = tick_ops(reference.state, v)
            in_flight[:] = [ops]
            try:
                reply = client.Patch(patch_stream("s", v, f"t{v}", ops, per_message=1), timeout=60)
            except grpc.RpcError:
                if killed.is_set():
                    return  # the authority died under us, as planned
                raise
            assert reply.digest == reference.apply(ops)
            assert reply.durable == (durability == "fsync")
            acked.append((reply.version, reply.digest))
            in_flight.clear()
            v += 1

    def run_writer() -> None:
        try:
            writer()
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)

    thread = threading.Thread(target=run_writer, daemon=True)
    thread.start()
    # 30 fsynced acks take a few seconds on an idle machine, far longer on a loaded CI one.
    deadline = time.monotonic() + 300
    while len(acked) < 30 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.set()
    first.kill()  # SIGKILL while the writer is sending its next patch
    thread.join(90)
    assert not thread.is_alive()
    if errors:
        raise errors[0]
    assert len(acked) >= 30
    last_version, last_digest = acked[-1]

    second = AuthorityProcess(
        "--data-dir", data_dir, "--snapshot-every", "7", "--durability", durability
    )
    channel = rpc.open_channel(second.address)
    client = stub(channel)
    info = client.GetSession(ca.GetSessionRequest(session_id="s")).session
    # The patch in flight may have reached the log before the kill (its reply never did).
    assert info.version in (last_version, last_version + 1)
    if info.version == last_version + 1:
        reference.apply(in_flight[0])
    else:
        assert info.digest == last_digest
    replica = SyncReceiver().receive_all(client.Sync(ca.SyncRequest(session_id="s")))
    assert_same_state(replica, reference.state)  # rows, mirror, version and digest chain
    # The restarted authority serves, health and reflection included, and keeps committing.
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="positronic.v1.CacheAuthority"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(second.address))
    assert "positronic.v1.CacheAuthority" in services.get_services()
    ops = tick_ops(reference.state, info.version)
    assert client.Patch(patch_stream("s", info.version, "after", ops)).digest == reference.apply(
        ops
    )
    assert second.terminate() == 0  # SIGTERM: graceful stop


def test_without_a_data_dir_it_says_so_and_prints_its_address_first():
    proc = AuthorityProcess()
    host, port = proc.address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    client = stub(rpc.open_channel(proc.address))
    assert client.ListSessions(ca.ListSessionsRequest()).sessions == []
    assert proc.terminate() == 0
    assert "memory only" in "".join(proc.stderr)
