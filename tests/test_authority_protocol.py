"""What docs/protocol.md and the proto comments promise a client in another language: the mirror
keeps what a merged row stands for, the digest chain hashes the ops canonically (fields this
authority does not know are not part of a commit), and the worked example in the doc is what
the authority computes."""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import pytest

from cache_authority.ops import GENESIS_DIGEST, chain_digest
from cache_authority.server import AuthorityConfig, start_authority
from cache_authority.sync import SyncReceiver
from positronic import rpc
from positronic.v1 import cache_authority_pb2 as ca
from positronic.v1 import session_pb2, tensor_pb2
from tests.authority_fixtures import (
    evict_pb,
    patch_stream,
    primed,
    replace_pb,
    running_authority,
    stub,
)


@pytest.fixture
def authority():
    with running_authority() as (server, channel):
        yield server, stub(channel)


def _replaced_texts(client, sid: str = "s") -> list[str]:
    got = client.GetSession(ca.GetSessionRequest(session_id=sid))
    return [e.replaced_text for e in got.mirror]


def _merge_twice(client) -> None:
    """Rows 10 11 12 13 -> 10 [40 = " b c"] 13 -> [41 = " a| b c"] 13."""
    client.Patch(patch_stream("s", 1, "", [replace_pb(1, [11, 12], 40, 5, replaced_text=" b c")]))
    client.Patch(
        patch_stream("s", 2, "", [replace_pb(0, [10, 40], 41, 6, replaced_text=" a| b c")])
    )


def test_the_mirror_keeps_what_a_merged_row_stands_for(authority):
    _, client = primed(authority)
    _merge_twice(client)
    assert _replaced_texts(client) == [" a| b c", ""]
    # A replica built from a Sync snapshot holds it too (the snapshot header is the mirror).
    replica = SyncReceiver()
    replica.receive_all(client.Sync(ca.SyncRequest(session_id="s", from_version=0)))
    assert replica.state is not None
    assert [m.replaced_text for m in replica.state.meta] == [" a| b c", ""]


@pytest.mark.parametrize("snapshot_every", [1, 1000], ids=["from snapshot", "from log"])
def test_replaced_text_survives_a_restart(tmp_path, snapshot_every):
    config = AuthorityConfig(
        listen="127.0.0.1:0", data_dir=str(tmp_path), snapshot_every=snapshot_every, grace_s=0
    )
    server = start_authority(config)
    channel = rpc.open_channel(f"127.0.0.1:{server.port}")
    primed((server, stub(channel)))
    _merge_twice(stub(channel))
    server.engine.wait_for_snapshots()
    channel.close()
    server.stop(0)
    server = start_authority(config)
    channel = rpc.open_channel(f"127.0.0.1:{server.port}")
    try:
        assert _replaced_texts(stub(channel)) == [" a| b c", ""]
    finally:
        channel.close()
        server.stop(0)


def _with_unknown_field(op: session_pb2.PatchOp) -> session_pb2.PatchOp:
    """The op as a client built from a newer .proto might send it: an extra field 99 (varint 7)
    inside the evict message."""
    body = op.SerializeToString()
    assert body[0] == 0x1A  # field 3 (evict), length-delimited
    inner = body[2:] + bytes([0x98, 0x06, 0x07])  # tag (99 << 3 | 0) = 792 as a varint, value 7
    return session_pb2.PatchOp.FromString(bytes([0x1A, len(inner)]) + inner)


def test_fields_the_authority_does_not_know_are_not_committed(authority):
    _, client = primed(authority)
    plain = evict_pb(0, 10)
    extended = _with_unknown_field(plain)
    assert extended.SerializeToString() != plain.SerializeToString()
    v1 = client.GetSession(ca.GetSessionRequest(session_id="s")).session.digest
    reply = client.Patch(patch_stream("s", 1, "", [extended]))
    assert reply.digest == chain_digest(v1, 2, [plain])
    (delta,) = list(client.Sync(ca.SyncRequest(session_id="s", from_version=1)))
    assert delta.delta.patch.ops[0].SerializeToString() == plain.SerializeToString()


def test_a_retry_with_unknown_fields_is_the_same_request(authority):
    _, client = primed(authority)
    first = client.Patch(patch_stream("s", 1, "r1", [evict_pb(0, 10)]))
    again = client.Patch(patch_stream("s", 1, "r1", [_with_unknown_field(evict_pb(0, 10))]))
    assert again.replayed and again.digest == first.digest


# -- the worked example of docs/protocol.md -----------------------------------------------------
DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def _doc_block(marker: str) -> str:
    """The fenced block right after `<!-- marker -->` in docs/protocol.md."""
    text = DOC.read_text(encoding="utf-8")
    after = text.split(f"<!-- {marker} -->", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]


def _example_ops() -> tuple[session_pb2.PatchOp, session_pb2.PatchOp, session_pb2.PatchOp]:
    """The doc's ops, built with protobuf."""

    def kv(keys: tuple[float, float], values: tuple[float, float]) -> tensor_pb2.KVBlock:
        def tensor(xs):
            data = struct.pack("<2f", *xs)
            return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1, 1, 1, 2], data=data)

        return tensor_pb2.KVBlock(keys=tensor(keys), values=tensor(values))

    prime = session_pb2.AppendOp(
        position=0, token_ids=[1], kv=kv((1.0, 0.0), (0.5, -0.5)), pieces=["<s>"],
        brightness=[255.0], source=session_pb2.TOKEN_SOURCE_STRUCTURAL,
    )  # fmt: skip
    decay = session_pb2.SetBrightnessOp(expected_row_count=1, brightness=[253.0])
    once = session_pb2.AppendOp(
        position=1, token_ids=[9038], kv=kv((0.0, 1.0), (0.25, 0.75)), pieces=["▁Once"],
        brightness=[255.0], source=session_pb2.TOKEN_SOURCE_PROMPT,
    )  # fmt: skip
    return (
        session_pb2.PatchOp(append=prime),
        session_pb2.PatchOp(set_brightness=decay),
        session_pb2.PatchOp(append=once),
    )


def _printed_digests() -> dict[str, str]:
    lines = _doc_block("digest-example-output").strip().splitlines()
    return {name.strip(): value.strip() for name, value in (line.split("=") for line in lines)}


def test_the_doc_example_ops_are_what_protobuf_encodes():
    script = _doc_block("digest-example")
    given = dict(re.findall(r"^(op_\w+)=([0-9a-f]+)$", script, re.MULTILINE))
    ops = _example_ops()
    assert given == {
        name: op.SerializeToString(deterministic=True).hex()
        for name, op in zip(("op_1", "op_2a", "op_2b"), ops, strict=True)
    }


def test_the_doc_example_script_prints_the_doc_digests(tmp_path):
    script = tmp_path / "digest.sh"
    script.write_text(_doc_block("digest-example"))
    out = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    printed = {k.strip(): v.strip() for k, v in (line.split("=") for line in out.splitlines())}
    assert printed == _printed_digests()


def test_a_real_authority_commits_the_doc_example_with_the_doc_digests(authority):
    _, client = authority
    geometry = session_pb2.ModelGeometry(
        num_layers=1, num_kv_heads=1, head_dim=2, dtype=tensor_pb2.DTYPE_FLOAT32,
        rope=session_pb2.RopeParameters(inv_freq=[1.0]), vocab_size=32000,
    )  # fmt: skip
    created = client.CreateSession(
        ca.CreateSessionRequest(
            session_id="doc",
            geometry=geometry,
            budget=session_pb2.Budget(target_rows=4, hard_max_rows=4),
        )
    ).session
    digests = _printed_digests()
    assert created.digest.hex() == digests["genesis"] == GENESIS_DIGEST.hex()
    prime, decay, once = _example_ops()
    first = client.Patch(patch_stream("doc", 0, "", [prime]))
    second = client.Patch(patch_stream("doc", 1, "", [decay, once]))
    assert first.digest.hex() == digests["digest_1"]
    assert second.digest.hex() == digests["digest_2"]
    got = client.GetSession(ca.GetSessionRequest(session_id="doc"))
    assert [(e.token_id, e.piece, e.brightness) for e in got.mirror] == [
        (1, "<s>", 253.0),
        (9038, "▁Once", 255.0),
    ]
