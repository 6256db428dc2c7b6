"""The driver's side of the wire: stubs for both services, retries with backoff, chunked Patch,
and a client interceptor that counts mutating RPCs."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from positronic.codec import MAX_CHUNK_BYTES
from positronic.rpc import open_channel
from positronic.tls import ClientTls
from positronic.v1 import (
    cache_authority_pb2,
    cache_authority_pb2_grpc,
    model_worker_pb2_grpc,
    session_pb2,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

PATCH_METHOD = "/positronic.v1.CacheAuthority/Patch"
# Codes worth retrying: the peer is down or restarting (UNAVAILABLE), or a restarted worker has
# not caught up with the authority yet (ABORTED from a compute RPC).
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class MutationCounter(grpc.StreamUnaryClientInterceptor, grpc.UnaryUnaryClientInterceptor):
    """Counts calls of the authority's only mutating RPC, Patch (every attempt counts)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.patch_calls = 0

    def _count(self, method: str) -> None:
        if method == PATCH_METHOD:
            with self._lock:
                self.patch_calls += 1

    def intercept_stream_unary(self, continuation, details, request_iterator):
        self._count(details.method)
        return continuation(details, request_iterator)

    def intercept_unary_unary(self, continuation, details, request):
        self._count(details.method)
        return continuation(details, request)


@dataclass
class Endpoints:
    """Stubs for one authority and its workers, and the channels behind them.

    The worker address may name several workers ("A:P,B:P", or "dns:///name:port" for every
    address of a name): calls go round-robin over those that answer, and a call that fails on
    a lost worker is retried on another (workers hold no state a retry needs).
    """

    authority: cache_authority_pb2_grpc.CacheAuthorityStub
    worker: model_worker_pb2_grpc.ModelWorkerStub
    counter: MutationCounter
    channels: list[grpc.Channel] = field(default_factory=list)

    @classmethod
    def connect(
        cls,
        authority_address: str,
        worker_address: str,
        auth_token: str | None = None,
        tls: ClientTls | None = None,
    ) -> Endpoints:
        counter = MutationCounter()
        a = open_channel(authority_address, auth_token, interceptors=[counter], tls=tls)
        w = open_channel(worker_address, auth_token, tls=tls)
        return cls(
            authority=cache_authority_pb2_grpc.CacheAuthorityStub(a),
            worker=model_worker_pb2_grpc.ModelWorkerStub(w),
            counter=counter,
            channels=[a, w],
        )

    def close(self) -> None:
        for c in self.channels:
            c.close()


def call_with_retry(
    fn: Callable[[], T],
    what: str,
    *,
    timeout_s: float = 60.0,
    retry_codes: Sequence[grpc.StatusCode] = RETRYABLE,
    first_delay_s: float = 0.05,
    max_delay_s: float = 2.0,
) -> T:
    """Call fn, retrying with exponential backoff while it fails with a retryable code."""
    deadline = time.monotonic() + timeout_s
    delay = first_delay_s
    attempt = 0
    while True:
        try:
            return fn()
        except grpc.RpcError as e:
            code = e.code()  # type: ignore[attr-defined]
            attempt += 1
            if code not in retry_codes or time.monotonic() + delay > deadline:
                raise
            logger.warning("%s failed (%s), retry %d in %.2fs", what, code.name, attempt, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay_s)


def patch_requests(
    session_id: str,
    expected_version: int,
    request_id: str,
    ops: Sequence[session_pb2.PatchOp],
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
) -> Iterator[cache_authority_pb2.PatchRequest]:
    """One Patch as a stream of messages, each carrying ops worth at most ~max_chunk_bytes; the
    last says end_of_patch, without which the authority commits nothing."""
    batch: list[session_pb2.PatchOp] = []
    size = 0
    for op in ops:
        op_size = op.ByteSize()
        if batch and size + op_size > max_chunk_bytes:
            yield cache_authority_pb2.PatchRequest(
                session_id=session_id,
                expected_version=expected_version,
                request_id=request_id,
                ops=batch,
            )
            batch, size = [], 0
        batch.append(op)
        size += op_size
    yield cache_authority_pb2.PatchRequest(
        session_id=session_id,
        expected_version=expected_version,
        request_id=request_id,
        ops=batch,
        end_of_patch=True,
    )


def send_patch(
    endpoints: Endpoints,
    session_id: str,
    expected_version: int,
    request_id: str,
    ops: Sequence[session_pb2.PatchOp],
    *,
    timeout_s: float = 60.0,
    call_timeout_s: float = 30.0,
) -> cache_authority_pb2.PatchResponse:
    """Patch with retries on UNAVAILABLE and DEADLINE_EXCEEDED (each attempt has a deadline of
    call_timeout_s; retries go on for timeout_s): the request id makes a retry apply at most
    once, and a half-sent attempt commits nothing (end_of_patch)."""
    return call_with_retry(
        lambda: endpoints.authority.Patch(
            patch_requests(session_id, expected_version, request_id, ops),
            timeout=call_timeout_s,
        ),
        f"Patch {session_id}@{expected_version}",
        timeout_s=timeout_s,
    )
