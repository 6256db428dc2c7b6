"""What the driver's calls cost on the wire: a client interceptor that records, per RPC, its
latency and the serialized size of its request and response messages, and cuts the record into
loop iterations at each Patch (the one mutating call of an iteration, its last).

The same recorder serves the in-process mode, where no gRPC channel exists: `DirectStub`'s
`on_call` hook and `measured_stub` give it the same numbers (sizes are what the messages would
take on the wire).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc


@dataclass
class CallRecord:
    method: str  # short name, e.g. "Step"
    latency_s: float
    request_bytes: int
    response_bytes: int


@dataclass
class Iteration:
    bytes: int  # request + response bytes of every driver RPC of the iteration
    rows: int  # cache rows the iteration's Step attended (before its Append)
    edited: bool  # it asked for a repair or its Patch merged or evicted rows
    end_s: float  # perf_counter() when its Patch returned


@dataclass
class WireRecorder:
    """Every call's record; iterations end at each Patch after the first (the prime)."""

    calls: list[CallRecord] = field(default_factory=list)
    iterations: list[Iteration] = field(default_factory=list)
    on_step: Callable[[], None] | None = None  # progress hook, called after each Step
    _pending: int = 0
    _rows: int = 0
    _edited: bool = False
    _patches: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(
        self, method: str, latency_s: float, req: int, resp: int, *, rows: int = -1, edits: int = 0
    ) -> None:
        """One finished call. rows: a Step's or Tick's attended rows; edits: a Patch's merges +
        evictions, or a Tick's replacements."""
        name = method.rsplit("/", 1)[-1]
        with self._lock:
            self.calls.append(CallRecord(name, latency_s, req, resp))
            self._pending += req + resp
            if rows >= 0:
                self._rows = rows
            if name == "Repair" or (name == "Tick" and edits > 0):
                self._edited = True
            if name == "Patch":
                self._patches += 1
                if self._patches > 1:  # the first Patch primes the session
                    edited = self._edited or edits > 0
                    self.iterations.append(
                        Iteration(self._pending, self._rows, edited, time.perf_counter())
                    )
                self._pending, self._edited = 0, False
        if name in ("Step", "Tick") and self.on_step is not None:
            self.on_step()


def _size(message: Any) -> int:
    return int(message.ByteSize()) if hasattr(message, "ByteSize") else 0


def _rows(response: Any) -> int:
    """Rows a Step or Tick attended: its attention row covers them and the input token."""
    attention = getattr(response, "attention", None)
    return len(attention) - 1 if attention is not None else -1


def _merges(response: Any) -> int:
    """Replacements a Tick built."""
    return len(getattr(response, "merges", ()))


def _edits(messages: list[Any]) -> int:
    """ReplacePair and Evict ops of a Patch stream."""
    return sum(
        op.WhichOneof("op") in ("replace_pair", "evict")
        for m in messages
        for op in getattr(m, "ops", ())
    )


class _CountedIterator:
    """A response stream whose message sizes are added up as it is consumed."""

    def __init__(self, inner, on_done: Callable[[int], None]):
        self._inner = iter(inner)
        self._call = inner
        self._on_done = on_done
        self._bytes = 0
        self._done = False

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        try:
            msg = next(self._inner)
        except StopIteration:
            if not self._done:
                self._done = True
                self._on_done(self._bytes)
            raise
        self._bytes += _size(msg)
        return msg

    def cancel(self) -> bool:
        return bool(getattr(self._call, "cancel", lambda: False)())


class RecordingInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
):
    """Client interceptor feeding a WireRecorder (synchronous use: it waits for each result)."""

    def __init__(self, recorder: WireRecorder):
        self.recorder = recorder

    def intercept_unary_unary(self, continuation, details, request):
        t0 = time.perf_counter()
        outcome = continuation(details, request)
        try:
            response = outcome.result()
        except grpc.RpcError:
            return outcome
        self.recorder.record(
            details.method,
            time.perf_counter() - t0,
            _size(request),
            _size(response),
            rows=_rows(response),
            edits=_merges(response),
        )
        return outcome

    def intercept_stream_unary(self, continuation, details, request_iterator):
        messages = list(request_iterator)  # a Patch: a few messages, already built
        t0 = time.perf_counter()
        outcome = continuation(details, iter(messages))
        try:
            response = outcome.result()
        except grpc.RpcError:
            return outcome
        sent = sum(_size(m) for m in messages)
        self.recorder.record(
            details.method, time.perf_counter() - t0, sent, _size(response), edits=_edits(messages)
        )
        return outcome

    def intercept_unary_stream(self, continuation, details, request):
        t0 = time.perf_counter()
        call = continuation(details, request)

        def done(n: int) -> None:
            self.recorder.record(details.method, time.perf_counter() - t0, _size(request), n)

        return _CountedIterator(call, done)


class MeasuredStub:
    """A DirectStub (or any stub) whose calls feed a WireRecorder, for the in-process mode."""

    def __init__(self, stub: Any, recorder: WireRecorder):
        self._stub = stub
        self._recorder = recorder

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)
        recorder = self._recorder

        def call(request, timeout=None, metadata=None):
            edits = 0
            if isinstance(request, Iterator):  # a client stream (Patch)
                messages = list(request)
                sent, edits = sum(_size(m) for m in messages), _edits(messages)
                request = iter(messages)
            else:
                sent = _size(request)
            t0 = time.perf_counter()
            response = method(request, timeout=timeout, metadata=metadata)
            if hasattr(response, "__next__"):  # a server stream (Prefill)
                out = list(response)
                latency = time.perf_counter() - t0
                recorder.record(name, latency, sent, sum(map(_size, out)))
                return iter(out)
            latency = time.perf_counter() - t0
            edits = edits or _merges(response)
            recorder.record(name, latency, sent, _size(response), rows=_rows(response), edits=edits)
            return response

        return call
