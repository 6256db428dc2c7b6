"""gRPC plumbing shared by both services and the driver: servers with health, reflection and
bearer-token auth; channels; and the one place where domain errors become gRPC statuses.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

logger = logging.getLogger(__name__)

# A prime or a full snapshot streams in 2 MiB chunks; a single message may still carry a few
# chunks' worth of ops, so allow headroom over gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

_CODES = {
    "INVALID_ARGUMENT",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "UNAVAILABLE",
    "UNAUTHENTICATED",
}


def abort(context: grpc.ServicerContext, code_name: str, message: str, details=()) -> None:
    """Abort the RPC with a google.rpc.Status: code, message and packed detail messages."""
    if code_name not in _CODES:
        raise ValueError(f"unknown status {code_name}")
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    status = status_pb2.Status(code=getattr(code_pb2, code_name), message=message, details=packed)
    context.abort_with_status(rpc_status.to_status(status))


def status_details(error: grpc.RpcError) -> list[any_pb2.Any]:
    """The packed details of a rich error status (empty when there are none)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    return list(status.details) if status is not None else []


class BearerAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call without `authorization: Bearer <token>` (health checks included,
    except when `open_methods` names them)."""

    def __init__(self, token: str, open_methods: Iterable[str] = ()):
        self._expected = f"Bearer {token}".encode()
        self._open = set(open_methods)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)
        self._deny_client_stream = grpc.stream_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method in self._open:
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        got = metadata.get("authorization", "")
        got_bytes = got.encode() if isinstance(got, str) else got
        if hmac.compare_digest(got_bytes, self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_streaming and not handler.response_streaming:
            return self._deny_client_stream
        if handler.response_streaming:
            return self._deny_stream
        return self._deny_unary


HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
HEALTH_WATCH_METHOD = "/grpc.health.v1.Health/Watch"


@dataclass
class RunningServer:
    """A started gRPC server, its bound port and its health servicer."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: Sequence[str] = ()
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace: float | None = 1.0) -> None:
        self.set_serving(False)
        self.server.stop(grace).wait()
        for fn in self.on_stop:
            fn()


def start_server(
    listen: str,
    register: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    *,
    auth_token: str | None = None,
    max_workers: int = 16,
    serving: bool = True,
) -> RunningServer:
    """Start a server on `listen` (HOST:PORT, port 0 for any) with health and reflection.

    Health checks stay open when auth is on, so orchestrators can probe without the token.
    """
    interceptors: list[grpc.ServerInterceptor] = []
    if auth_token:
        interceptors.append(
            BearerAuthInterceptor(
                auth_token, open_methods=(HEALTH_CHECK_METHOD, HEALTH_WATCH_METHOD)
            )
        )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=interceptors,
        options=CHANNEL_OPTIONS,
    )
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"could not bind {listen}")
    server.start()
    running = RunningServer(server, port, health_servicer, tuple(service_names))
    running.set_serving(serving)
    return running


def bound_address(listen: str, port: int) -> str:
    host = listen.rsplit(":", 1)[0]
    if host in ("", "[::]", "0.0.0.0"):
        host = "127.0.0.1"
    return f"{host}:{port}"


class _BearerClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to every call (works on insecure loopback channels too)."""

    def __init__(self, token: str):
        self._pair = ("authorization", f"Bearer {token}")

    def _details(self, d):
        md = list(d.metadata or ())
        md.append(self._pair)
        return d._replace(metadata=md)

    def intercept_unary_unary(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_unary_stream(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_stream_unary(self, continuation, d, request_iterator):
        return continuation(self._details(d), request_iterator)

    def intercept_stream_stream(self, continuation, d, request_iterator):
        return continuation(self._details(d), request_iterator)


def open_channel(
    address: str, auth_token: str | None = None, interceptors: Sequence = ()
) -> grpc.Channel:
    """An insecure channel with raised message limits, the bearer token, and extra interceptors."""
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    chain = list(interceptors)
    if auth_token:
        chain.append(_BearerClientInterceptor(auth_token))
    if chain:
        channel = grpc.intercept_channel(channel, *chain)
    return channel


def read_token_file(path: str | None) -> str | None:
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"auth token file {path} is empty")
    return token
