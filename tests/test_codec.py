"""Tensor codec: exact round trips for every wire dtype, malformed input refused, chunking."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from positronic import codec
from positronic.v1 import tensor_pb2

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3, 4), (1, 4, 5, 8)])
def test_round_trip_is_bit_exact(dtype, shape):
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=g) * 1000).to(dtype)
    else:
        t = torch.randint(-(2**31), 2**31 - 1, shape, generator=g).to(dtype)
    msg = codec.encode(t)
    assert msg.dtype == codec.dtype_to_wire(dtype)
    assert list(msg.shape) == list(shape)
    back = codec.decode(tensor_pb2.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and tuple(back.shape) == tuple(shape)
    # Compare bits, so NaN payloads and -0.0 count too.
    assert torch.equal(back.view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_special_float_values_survive():
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40], dtype=torch.float32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = t.to(dtype)
        assert torch.equal(codec.decode(codec.encode(x)).view(torch.uint8), x.view(torch.uint8))


def test_non_contiguous_input_is_encoded_in_logical_order():
    t = torch.arange(12, dtype=torch.float32).view(3, 4).t()
    assert torch.equal(codec.decode(codec.encode(t)), t)


def test_decoded_tensor_is_writable_and_independent():
    msg = codec.encode(torch.ones(4))
    out = codec.decode(msg)
    out += 1
    assert torch.equal(codec.decode(msg), torch.ones(4))


@pytest.mark.parametrize(
    "msg, fragment",
    [
        (tensor_pb2.Tensor(dtype=0, shape=[1], data=b"\0" * 4), "unknown wire dtype"),
        (tensor_pb2.Tensor(dtype=99, shape=[1], data=b"\0" * 4), "unknown wire dtype"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2], data=b"\0" * 7), "needs 8"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT16, shape=[-1], data=b""), "negative"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BFLOAT16, shape=[2, 2], data=b"\0"), "needs 8"),
    ],
)
def test_malformed_tensors_raise_codec_error(msg, fragment):
    with pytest.raises(codec.CodecError, match=fragment):
        codec.decode(msg)


@pytest.mark.parametrize(
    "shape, fragment",
    [
        ([2**40, 2**40, 0, 8], "over the limit"),  # issue 12: torch.empty overflowed (INTERNAL)
        ([2**62, 0], "over the limit"),
        ([2**33, 0, 0, 0], "over the limit"),
        ([1] * 9, "dimensions"),
        ([0] * 10**5, "dimensions"),
    ],
)
def test_hostile_empty_shapes_are_codec_errors(shape, fragment):
    for dtype in (tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_BFLOAT16, tensor_pb2.DTYPE_INT64):
        with pytest.raises(codec.CodecError, match=fragment):
            codec.decode(tensor_pb2.Tensor(dtype=dtype, shape=shape, data=b""))


def test_a_hostile_shape_in_a_patch_is_invalid_argument():
    from cache_authority.ops import PatchError, op_from_pb
    from positronic.v1 import session_pb2

    bad = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2**40, 2**40, 0, 8])
    op = session_pb2.PatchOp(
        append=session_pb2.AppendOp(
            position=0, token_ids=[1], kv=tensor_pb2.KVBlock(keys=bad, values=bad)
        )
    )
    with pytest.raises(PatchError) as e:
        op_from_pb(op)
    assert e.value.status.name == "INVALID_ARGUMENT"


def test_element_limit_is_enforced_before_allocation():
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[10**6, 10**6], data=b"")
    with pytest.raises(codec.CodecError, match="exceeds the limit"):
        codec.decode(msg, max_numel=10**6)


@settings(max_examples=50, deadline=None)
@given(
    size=st.integers(0, 5 * 1024 * 1024 + 3),
    limit=st.sampled_from([1, 1000, codec.MAX_CHUNK_BYTES]),
)
def test_split_and_join_bytes(size, limit):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    chunks = list(codec.split_bytes(data, limit))
    assert all(len(c) <= limit for c in chunks)
    assert len(chunks) == max(1, -(-size // limit))
    assert codec.join_bytes(chunks) == data


def test_split_rows_keeps_each_slice_under_the_limit():
    t = torch.zeros(22, 4, 2048, 64, dtype=torch.float16)  # TinyLlama geometry, 2,048 tokens
    slices = codec.split_rows(t, dim=2)
    assert slices[0].start == 0 and slices[-1].stop == 2048
    assert all(a.stop == b.start for a, b in itertools.pairwise(slices))
    for s in slices:
        assert len(codec.encode(t[:, :, s]).data) <= codec.MAX_CHUNK_BYTES
    # 22 * 4 * 64 * 2 bytes = 11 KiB a token: 186 tokens a chunk.
    assert slices[0].stop == codec.MAX_CHUNK_BYTES // (22 * 4 * 64 * 2)
