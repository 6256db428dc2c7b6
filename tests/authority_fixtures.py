"""Shared helpers of the cache authority tests: a tiny geometry, op builders, a reference replica
built from the ops a client sent, state comparison, and servers (in-process or a real process)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
import torch

from cache_authority.convert import geometry_to_pb
from cache_authority.ops import GENESIS_DIGEST, chain_digest, ops_from_pb
from cache_authority.rows import Budget, Geometry, SessionState
from cache_authority.server import AuthorityConfig, AuthorityServer, start_authority
from cache_authority.state import apply_ops
from positronic import codec, rpc
from positronic.rope import Rope
from positronic.v1 import cache_authority_pb2 as ca
from positronic.v1 import cache_authority_pb2_grpc, session_pb2, tensor_pb2

REPO = Path(__file__).resolve().parents[1]
L, H, D, VOCAB = 2, 2, 8, 50


def tiny_geometry(dtype: torch.dtype = torch.float32) -> Geometry:
    return Geometry(L, H, D, dtype, Rope.from_theta(D), VOCAB, model_fingerprint="tiny")


def kv(n: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random K/V for n tokens, [L, H, n, D] each, reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(L, H, n, D, generator=g).to(dtype),
        torch.randn(L, H, n, D, generator=g).to(dtype),
    )


def kv_pb(n: int, seed: int, dtype: torch.dtype = torch.float32) -> tensor_pb2.KVBlock:
    k, v = kv(n, seed, dtype)
    return tensor_pb2.KVBlock(keys=codec.encode(k), values=codec.encode(v))


def append_pb(
    position: int, token_ids: Sequence[int], seed: int, dtype=torch.float32, **kw
) -> session_pb2.PatchOp:
    return session_pb2.PatchOp(
        append=session_pb2.AppendOp(
            position=position,
            token_ids=list(token_ids),
            kv=kv_pb(len(token_ids), seed, dtype),
            pieces=[f"<{t}>" for t in token_ids],
            **kw,
        )
    )


def replace_pb(
    position: int, expected: Sequence[int], token_id: int, seed: int, dtype=torch.float32, **kw
):
    return session_pb2.PatchOp(
        replace_pair=session_pb2.ReplacePairOp(
            position=position,
            expected_token_ids=list(expected),
            token_id=token_id,
            kv=kv_pb(1, seed, dtype),
            piece=f"<{token_id}>",
            **kw,
        )
    )


def evict_pb(position: int, expected: int) -> session_pb2.PatchOp:
    return session_pb2.PatchOp(
        evict=session_pb2.EvictOp(position=position, expected_token_id=expected)
    )


def brightness_pb(values: Sequence[float]) -> session_pb2.PatchOp:
    return session_pb2.PatchOp(
        set_brightness=session_pb2.SetBrightnessOp(
            expected_row_count=len(values), brightness=list(values)
        )
    )


class Reference:
    """What a worker knows: the session as created plus every acknowledged patch, replayed with
    apply_ops into a replica (rotated keys kept), the digest chain computed independently of the
    authority."""

    def __init__(
        self,
        session_id: str,
        hard_max: int,
        seed_brightness: float = 255.0,
        dtype: torch.dtype = torch.float32,
    ):
        self.state = SessionState(
            session_id,
            tiny_geometry(dtype),
            Budget(hard_max, hard_max),
            seed_brightness,
            rotated=True,
        )
        self.state.digest = GENESIS_DIGEST

    def apply(self, ops: Sequence[session_pb2.PatchOp]) -> bytes:
        version = self.state.version + 1
        digest = chain_digest(self.state.digest, version, list(ops))
        apply_ops(self.state, ops_from_pb(ops), version, digest)
        return digest


def assert_same_state(a: SessionState, b: SessionState) -> None:
    """Rows, slots and mirror identical; rotated keys too where both states keep them."""
    assert (a.session_id, a.version, a.digest) == (b.session_id, b.version, b.digest)
    assert (a.row_count, a.next_ledger_id) == (b.row_count, b.next_ledger_id)
    assert a.position_offset == b.position_offset
    assert a.live_token_ids() == b.live_token_ids()
    assert a.live_brightness() == b.live_brightness()
    assert a.meta == b.meta
    assert torch.equal(a.live_origin_positions(), b.live_origin_positions())
    assert torch.equal(a.live_canonical_keys(), b.live_canonical_keys())
    assert torch.equal(a.live_values(), b.live_values())
    if a.rotated and b.rotated:
        assert torch.equal(a.live_keys(), b.live_keys())


def create_request(session_id: str, hard_max: int = 16, target: int | None = None, **kw):
    return ca.CreateSessionRequest(
        session_id=session_id,
        geometry=geometry_to_pb(tiny_geometry()),
        budget=session_pb2.Budget(target_rows=target or hard_max, hard_max_rows=hard_max),
        **kw,
    )


def patch_stream(
    session_id: str, version: int, request_id: str, ops, per_message: int = 0, end: bool = True
):
    """One Patch as PatchRequest messages; per_message > 0 spreads ops over several messages,
    the header only on the first; end_of_patch on the last unless `end` is False."""
    ops = list(ops)
    header = dict(session_id=session_id, expected_version=version, request_id=request_id)
    step = per_message if per_message > 0 else max(len(ops), 1)
    msgs = []
    for i in range(0, max(len(ops), 1), step):
        msgs.append(ca.PatchRequest(ops=ops[i : i + step], **(header if i == 0 else {})))
    msgs[-1].end_of_patch = end
    return iter(msgs)


@contextmanager
def running_authority(**config) -> Iterator[tuple[AuthorityServer, grpc.Channel]]:
    """An in-process authority on a free port and a channel to it."""
    config.setdefault("listen", "127.0.0.1:0")
    config.setdefault("grace_s", 0.2)
    server = start_authority(AuthorityConfig(**config))
    channel = rpc.open_channel(f"127.0.0.1:{server.port}", config.get("auth_token"))
    try:
        yield server, channel
    finally:
        channel.close()
        server.stop(0.2)


def stub(channel: grpc.Channel) -> cache_authority_pb2_grpc.CacheAuthorityStub:
    return cache_authority_pb2_grpc.CacheAuthorityStub(channel)


class AuthorityProcess:
    """A real `positronic authority` process; its first stdout line is its address."""

    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "positronic.cli", "authority", "--listen", "127.0.0.1:0"]
        self.proc = subprocess.Popen(
            [*cmd, *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        line = [""]
        reader = threading.Thread(target=lambda: line.__setitem__(0, self.proc.stdout.readline()))
        reader.start()
        reader.join(60)
        if not line[0].strip():
            self.proc.kill()
            raise RuntimeError(f"authority printed no address; stderr: {''.join(self.stderr)}")
        self.address = line[0].strip()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for text in self.proc.stderr:
            self.stderr.append(text)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self) -> int:
        self.proc.terminate()
        return self.proc.wait(30)


def primed(authority, sid: str = "s", tokens=(10, 11, 12, 13), hard_max: int = 16):
    """(server, client) with session `sid` created and primed with `tokens` at version 1."""
    server, client = authority
    client.CreateSession(create_request(sid, hard_max=hard_max))
    client.Patch(patch_stream(sid, 0, "prime", [append_pb(0, tokens, seed=1)]))
    return server, client


def version_and_digest(client, sid: str = "s") -> tuple[int, bytes, list[int]]:
    """What GetSession says: version, digest and the token id of every row."""
    got = client.GetSession(ca.GetSessionRequest(session_id=sid))
    return got.session.version, got.session.digest, [e.token_id for e in got.mirror]
