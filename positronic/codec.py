"""Tensor codec: torch tensors to and from the wire (`positronic.v1.Tensor`), and chunking.

Tensors travel as dtype + shape + raw row-major little-endian bytes. bf16 has no numpy dtype, so
every dtype goes through a uint8 view of the tensor's own storage: the round trip is bit-exact.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from positronic.v1 import tensor_pb2

MAX_CHUNK_BYTES = 2 * 1024 * 1024  # per-message tensor payload; well under gRPC's 4 MiB default
# Any wire shape: at most this many dimensions, and at most this many elements counting empty
# dimensions as 1 (an empty [2^40, 2^40, 0, 8] overflows torch.empty). Far above any real block:
# a message carries at most 64 MiB.
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 32

_TO_WIRE = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.int32: tensor_pb2.DTYPE_INT32,
}
_FROM_WIRE: dict[Any, torch.dtype] = {wire: dtype for dtype, wire in _TO_WIRE.items()}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("positronic's wire format assumes a little-endian host")


class CodecError(ValueError):
    """A wire tensor that cannot be decoded: unknown dtype, bad shape, wrong byte count."""


def dtype_to_wire(dtype: torch.dtype) -> Any:
    try:
        return _TO_WIRE[dtype]
    except KeyError:
        raise CodecError(f"dtype {dtype} has no wire encoding") from None


def dtype_from_wire(wire: Any) -> torch.dtype:
    try:
        return _FROM_WIRE[wire]
    except KeyError:
        raise CodecError(f"unknown wire dtype {wire}") from None


def dtype_name(wire: Any) -> str:
    return tensor_pb2.DType.Name(wire) if wire in _FROM_WIRE else f"DTYPE_{wire}"


def tensor_nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * dtype.itemsize


def encode(t: torch.Tensor) -> tensor_pb2.Tensor:
    """Tensor -> wire. Moves to CPU; copies only when the tensor is not contiguous."""
    t = t.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return tensor_pb2.Tensor(dtype=dtype_to_wire(t.dtype), shape=list(t.shape), data=data)


def decode(msg: tensor_pb2.Tensor, *, max_numel: int | None = None) -> torch.Tensor:
    """Wire -> tensor (a fresh, writable CPU tensor). Raises CodecError on malformed input."""
    dtype = dtype_from_wire(msg.dtype)
    if len(msg.shape) > MAX_DIMS:
        raise CodecError(f"tensor of {len(msg.shape)} dimensions; at most {MAX_DIMS}")
    shape = [int(s) for s in msg.shape]
    if any(s < 0 for s in shape):
        raise CodecError(f"negative dimension in shape {shape}")
    numel = extent = 1
    for s in shape:
        numel *= s
        extent *= max(s, 1)
    if max_numel is not None and numel > max_numel:
        raise CodecError(f"tensor of {numel} elements exceeds the limit of {max_numel}")
    if extent > MAX_ELEMENTS:
        raise CodecError(f"shape {shape} is over the limit of {MAX_ELEMENTS} elements")
    expected = tensor_nbytes(dtype, shape)
    if len(msg.data) != expected:
        raise CodecError(
            f"{dtype_name(msg.dtype)} tensor of shape {shape} needs {expected} bytes, "
            f"got {len(msg.data)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # One copy (the bytearray: a writable tensor of its own, not a view of the message), read
    # as `dtype` directly: the byte count was checked above.
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).view(shape)


def encode_kv(keys: torch.Tensor, values: torch.Tensor) -> tensor_pb2.KVBlock:
    """Keys and values [L, H, N, D] -> one wire KVBlock."""
    return tensor_pb2.KVBlock(keys=encode(keys), values=encode(values))


def split_bytes(
    data: bytes | memoryview, max_chunk_bytes: int = MAX_CHUNK_BYTES
) -> Iterator[bytes]:
    """Cut a payload into chunks of at most max_chunk_bytes (at least one chunk, maybe empty)."""
    if max_chunk_bytes <= 0:
        raise ValueError("max_chunk_bytes must be positive")
    view = memoryview(data)
    if len(view) == 0:
        yield b""
        return
    for start in range(0, len(view), max_chunk_bytes):
        yield bytes(view[start : start + max_chunk_bytes])


def join_bytes(chunks: Iterable[bytes]) -> bytes:
    return b"".join(chunks)


def split_rows(t: torch.Tensor, dim: int, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> list[slice]:
    """Slices along `dim` such that each slice of `t` encodes to at most max_chunk_bytes.

    One row (index along dim) is never split; a single row over the limit is its own slice.
    """
    n = t.shape[dim]
    row_bytes = max(1, t.numel() // max(n, 1) * t.element_size())
    per = max(1, max_chunk_bytes // row_bytes)
    return [slice(i, min(i + per, n)) for i in range(0, n, per)] or [slice(0, 0)]
