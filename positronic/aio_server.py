"""A grpc.aio server on its own event loop thread, behind the same start/stop interface as the
threaded server (`rpc.RunningServer`).

Why asyncio: a stream that waits (Watch, Sync follow, a Patch whose client has not sent its next
message) is a suspended coroutine, not a parked thread, so thousands of them never starve health
checks and unary calls. Handlers run their blocking work in a thread pool of their own.
The loop lives in a daemon thread so that callers (tests, the embedded mode, `main()`) stay
synchronous.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import _async as aio_health
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from positronic.rpc import (
    CHANNEL_OPTIONS,
    HEALTH_CHECK_METHOD,
    HEALTH_WATCH_METHOD,
    AioBearerAuthInterceptor,
    bind,
)
from positronic.tls import ServerTls


class _Malformed:
    """What a request that does not parse becomes, instead of an exception grpc would turn into
    UNKNOWN (unary) or an INTERNAL bug report (streams)."""

    def __init__(self, error: Exception):
        self.message = str(error)[:200]


async def _refuse(context, request: _Malformed) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse: {request.message}"
    )


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Request bytes that are not a valid message of the method's type are INVALID_ARGUMENT.

    Applied to the methods under `prefix` (our services, whose handlers are coroutines and async
    generators), it swaps in a deserializer that cannot raise and refuses what it marked.
    """

    def __init__(self, prefix: str):
        self._prefix = prefix

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or handler.request_deserializer is None
            or not handler_call_details.method.startswith(self._prefix)
        ):
            return handler
        parse = handler.request_deserializer

        def tolerant(data: bytes):
            try:
                return parse(data)
            except Exception as e:  # DecodeError, and whatever a parser may raise on garbage
                return _Malformed(e)

        if handler.request_streaming and handler.response_streaming:
            return handler  # no such method in our services
        if handler.request_streaming:
            inner_su = handler.stream_unary

            async def stream_unary(request_iterator, context):
                async def checked():
                    async for request in request_iterator:
                        if isinstance(request, _Malformed):
                            await _refuse(context, request)
                        yield request

                return await inner_su(checked(), context)

            return handler._replace(request_deserializer=tolerant, stream_unary=stream_unary)
        if handler.response_streaming:
            inner_us = handler.unary_stream

            async def unary_stream(request, context):
                if isinstance(request, _Malformed):
                    await _refuse(context, request)
                responses = inner_us(request, context)
                try:
                    async for response in responses:
                        yield response
                finally:
                    await responses.aclose()  # its cleanup runs now, not when collected

            return handler._replace(request_deserializer=tolerant, unary_stream=unary_stream)
        inner_uu = handler.unary_unary

        async def unary_unary(request, context):
            if isinstance(request, _Malformed):
                await _refuse(context, request)
            return await inner_uu(request, context)

        return handler._replace(request_deserializer=tolerant, unary_unary=unary_unary)


class LoopThread:
    """An asyncio loop running forever in a daemon thread; `run(coro)` waits for a result."""

    def __init__(self, name: str = "aio"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class AioRunningServer:
    """A started grpc.aio server: its bound port, health servicer and loop thread."""

    server: grpc.aio.Server
    port: int
    health: aio_health.HealthServicer
    loop: LoopThread
    service_names: Sequence[str] = ()
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    def set_serving(self, serving: bool) -> None:
        self.loop.run(_set_health(self.health, self.service_names, serving))

    def stop(self, grace: float | None = 1.0) -> None:
        """NOT_SERVING, let calls in flight finish for `grace` seconds, cancel the rest."""
        if self.loop.loop.is_closed():
            return
        self.set_serving(False)
        self.loop.run(self.server.stop(grace))
        for fn in self.on_stop:
            fn()
        self.loop.close()


async def _set_health(servicer, names: Sequence[str], serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", *names):
        await servicer.set(name, status)


def start_aio_server(
    listen: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    *,
    auth_token: str | None = None,
    tls: ServerTls | None = None,
    options: Sequence[tuple[str, Any]] = (),
    serving: bool = True,
) -> AioRunningServer:
    """Start a grpc.aio server on `listen` with health and reflection (health open to callers
    without the token, as with the threaded server). Requests to `service_names` that do not
    parse are INVALID_ARGUMENT."""
    loop = LoopThread("authority-aio")

    async def start() -> tuple[grpc.aio.Server, int, aio_health.HealthServicer]:
        interceptors: list[grpc.aio.ServerInterceptor] = [
            MalformedRequestInterceptor(prefix)
            for prefix in {"/" + name.rpartition(".")[0] + "." for name in service_names}
        ]
        if auth_token:
            interceptors.append(
                AioBearerAuthInterceptor(
                    auth_token, open_methods=(HEALTH_CHECK_METHOD, HEALTH_WATCH_METHOD)
                )
            )
        server = grpc.aio.server(interceptors=interceptors, options=[*CHANNEL_OPTIONS, *options])
        register(server)
        health_servicer = aio_health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        port = bind(server, listen, tls)
        await server.start()
        return server, port, health_servicer

    try:
        server, port, health_servicer = loop.run(start())
    except BaseException:
        loop.close()
        raise
    running = AioRunningServer(server, port, health_servicer, loop, tuple(service_names))
    running.set_serving(serving)
    return running
