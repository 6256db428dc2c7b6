"""gRPC plumbing shared by both services and the driver: servers with health, reflection and
bearer-token auth; channels; and the one place where domain errors become gRPC statuses.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from positronic.limits import clip_message
from positronic.tls import ClientTls, ServerTls

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


def status_of(code_name: str, message: str, details=()) -> grpc.Status:
    """A google.rpc.Status (code, message cut to a bounded length, packed details) as gRPC sends
    it: code, details and the grpc-status-details-bin trailer."""
    if code_name not in _CODES:
        raise ValueError(f"unknown status {code_name}")
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    message = clip_message(message)
    status = status_pb2.Status(code=getattr(code_pb2, code_name), message=message, details=packed)
    return rpc_status.to_status(status)


def abort(context: grpc.ServicerContext, code_name: str, message: str, details=()) -> None:
    """Abort the RPC with a google.rpc.Status: code, message and packed detail messages."""
    context.abort_with_status(status_of(code_name, message, details))


async def abort_async(context, code_name: str, message: str, details=()) -> None:
    """abort() for an asyncio servicer context (grpc.aio has no abort_with_status)."""
    status = status_of(code_name, message, details)
    await context.abort(status.code, status.details, status.trailing_metadata)


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


class AioBearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """BearerAuthInterceptor for a grpc.aio server."""

    def __init__(self, token: str, open_methods: Iterable[str] = ()):
        self._expected = f"Bearer {token}".encode()
        self._open = set(open_methods)

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)
        self._deny_client_stream = grpc.stream_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method in self._open:
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        got = metadata.get("authorization", "")
        got_bytes = got.encode() if isinstance(got, str) else got
        if hmac.compare_digest(got_bytes, self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
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
    tls: ServerTls | None = None,
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
    port = bind(server, listen, tls)
    server.start()
    running = RunningServer(server, port, health_servicer, tuple(service_names))
    running.set_serving(serving)
    return running


def bind(server, listen: str, tls: ServerTls | None) -> int:
    """Bind `listen` (TLS when given); the bound port, OSError when it cannot be bound."""
    try:
        if tls is not None:
            port = server.add_secure_port(listen, tls.credentials())
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError as e:  # grpc.aio raises where the threaded server returns 0
        raise OSError(f"could not bind {listen}: {e}") from None
    if port == 0:
        raise OSError(f"could not bind {listen}")
    return port


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


ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def channel_target(address: str) -> tuple[str, str | None]:
    """(gRPC target, host name the server certificate must carry) for one address or several.

    HOST:PORT is used as is; so is anything with a scheme ("dns:///worker:50052" resolves to
    every address of the name). "A:P,B:P" becomes one ipv4:/ipv6: target over every address the
    hosts resolve to now, so that round_robin spreads calls over them; the certificate is then
    checked against the first host name.
    """
    parts = [p.strip() for p in address.split(",") if p.strip()]
    if len(parts) <= 1:
        return address.strip(), None
    resolved: list[tuple[int, str]] = []
    names = []
    for part in parts:
        host, sep, port = part.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address {part!r} must be HOST:PORT")
        try:
            ip = ipaddress.ip_address(host)
            resolved.append((ip.version, f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"))
        except ValueError:
            names.append(host)
            for family, *_, sockaddr in socket.getaddrinfo(
                host, int(port), type=socket.SOCK_STREAM
            ):
                version = 6 if family == socket.AF_INET6 else 4
                ip_text = sockaddr[0]
                resolved.append(
                    (version, f"[{ip_text}]:{port}" if version == 6 else f"{ip_text}:{port}")
                )
    versions = {v for v, _ in resolved}
    if len(versions) != 1:
        raise ValueError(f"addresses {address!r} mix IPv4 and IPv6; list one family")
    scheme = "ipv6" if versions == {6} else "ipv4"
    unique = list(dict.fromkeys(a for _, a in resolved))
    return f"{scheme}:{','.join(unique)}", names[0] if names else None


def open_channel(
    address: str,
    auth_token: str | None = None,
    interceptors: Sequence = (),
    tls: ClientTls | None = None,
) -> grpc.Channel:
    """A channel with raised message limits, round_robin over every address behind `address`
    (see channel_target), TLS when given, the bearer token, and extra interceptors."""
    target, host_name = channel_target(address)
    options: list[tuple[str, int | str]] = [*CHANNEL_OPTIONS, ("grpc.service_config", ROUND_ROBIN)]
    if tls is not None:
        name = tls.server_name or host_name
        if name:
            options.append(("grpc.ssl_target_name_override", name))
        channel = grpc.secure_channel(target, tls.credentials(), options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
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
