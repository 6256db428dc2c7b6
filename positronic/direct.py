"""Calling servicers directly, without gRPC: the benchmark's "in_process" mode.

A DirectStub turns `stub.Method(request)` into `servicer.Method(request, context)` with a context
whose abort raises a grpc.RpcError carrying the same code and details, so the loop driver runs
unchanged over it. Only the wire (serialization, HTTP/2, loopback) is left out.

Servicers written for grpc.aio (the authority) have coroutine and async-generator handlers, and
the stub hands back plain results and iterators, so a caller cannot tell the two kinds apart:

- a coroutine (a unary or client-stream call: Patch) runs to its end on an event loop of the
  calling thread, with `may_block()` true, so the servicer runs its engine work inline instead of
  hopping to its thread pool. A gRPC server keeps its one event loop free for every stream; here
  the loop serves this call only and the caller waits anyway, so the hops (caller -> loop thread
  -> pool thread -> loop thread -> caller, each a wake-up of a sleeping thread) bought nothing
  and cost ~1 ms per Patch on a busy machine;
- an async generator (a server stream: Sync, Watch) runs on a private event loop in a daemon
  thread, as it may wait for ever (a follow stream) and is read from other threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import grpc

_BLOCKING_OK: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "positronic_direct_blocking_ok", default=False
)


def may_block() -> bool:
    """True inside a coroutine handler a DirectStub runs on its caller's own thread: blocking
    there stalls nobody else, so the handler may call blocking code inline."""
    return _BLOCKING_OK.get()


class DirectRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailing=()):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self._trailing = code, details, tuple(trailing or ())

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._trailing


class DirectContext:
    """The parts of grpc.ServicerContext our servicers use."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []

    def abort(self, code, details, trailing_metadata=()):
        raise DirectRpcError(code, details, trailing_metadata)

    def abort_with_status(self, status):
        raise DirectRpcError(status.code, status.details, status.trailing_metadata)

    def is_active(self) -> bool:
        return True

    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return None

    def peer(self) -> str:
        return "direct"

    def add_callback(self, callback) -> bool:
        self._callbacks.append(callback)
        return True

    def set_code(self, code) -> None:
        pass

    def set_details(self, details) -> None:
        pass

    def set_trailing_metadata(self, metadata) -> None:
        pass

    def cancel(self) -> None:
        for cb in self._callbacks:
            cb()


class AsyncDirectContext(DirectContext):
    """The grpc.aio flavour: abort and send_initial_metadata are coroutines."""

    async def abort(self, code, details="", trailing_metadata=()):  # type: ignore[override]
        raise DirectRpcError(code, details, trailing_metadata)

    async def send_initial_metadata(self, metadata) -> None:
        pass


class _PrivateLoop:
    """An event loop in a daemon thread, started on first use."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def get(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, daemon=True).start()
            return self._loop

    def run(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.get()).result()


async def _aiter(items: Iterable) -> AsyncIterator:
    for item in items:
        yield item


class _SyncStream:
    """An async generator's items as a blocking iterator, one loop round trip each; cancel()
    (from any thread) ends it as a client's cancel ends a gRPC stream: a caller blocked in
    next() gets StopIteration, and the generator is closed on its loop."""

    def __init__(self, agen: AsyncIterator, loop: _PrivateLoop):
        self._agen, self._loop = agen, loop
        self._task: asyncio.Task | None = None  # the __anext__ in flight, on the loop
        self._done = False

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        future = asyncio.run_coroutine_threadsafe(self._next(), self._loop.get())
        try:
            return future.result()
        except (StopAsyncIteration, concurrent.futures.CancelledError):
            self.cancel()
            raise StopIteration from None
        except BaseException:
            self.cancel()
            raise

    async def _next(self):
        self._task = asyncio.current_task()
        return await self._agen.__anext__()

    async def _close(self) -> None:
        # The generator cannot be closed while an __anext__ runs in it: cancel that first.
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        await self._agen.aclose()  # type: ignore[attr-defined]

    def cancel(self) -> None:
        if self._done:
            return
        self._done = True
        asyncio.run_coroutine_threadsafe(self._close(), self._loop.get())


class DirectStub:
    """stub.Method(request_or_iterator) -> servicer.Method(request_or_iterator, context)."""

    def __init__(self, servicer: Any, on_call: Callable[[str], None] | None = None):
        self._servicer = servicer
        self._on_call = on_call
        self._loop = _PrivateLoop()
        self._local = threading.local()  # each calling thread's own event loop

    def _run_here(self, coro) -> Any:
        """Run a coroutine handler to its end on this thread's event loop, blocking allowed; on
        the private loop instead when this thread already runs a loop (an async caller)."""
        if asyncio._get_running_loop() is not None:
            return self._loop.run(coro)
        loop = getattr(self._local, "loop", None)
        if loop is None:
            loop = self._local.loop = asyncio.new_event_loop()
        token = _BLOCKING_OK.set(True)
        try:
            return loop.run_until_complete(coro)
        finally:
            _BLOCKING_OK.reset(token)

    def __getattr__(self, name: str):
        method = getattr(self._servicer, name)
        is_async = inspect.iscoroutinefunction(method)
        is_async_stream = inspect.isasyncgenfunction(method)

        def call(request, timeout=None, metadata=None):
            if self._on_call is not None:
                self._on_call(name)
            if not (is_async or is_async_stream):
                return method(request, DirectContext())
            if isinstance(request, Iterator):  # a client stream
                request = _aiter(request)
            if is_async_stream:
                return _SyncStream(method(request, AsyncDirectContext()), self._loop)
            return self._run_here(method(request, AsyncDirectContext()))

        return call
