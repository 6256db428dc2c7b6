"""Registering a servicer so that a request that does not parse is INVALID_ARGUMENT.

grpcio answers a request whose bytes are no valid message (corrupt wire format, invalid UTF-8 in
a string) with INTERNAL ("Exception deserializing request!") before any handler runs: a client's
bad bytes would read as a server bug. `register_servicer` builds the service's handlers from its
descriptor, as the generated `add_*Servicer_to_server` does, with a parser that never raises; a
handler given an unparsable request aborts with INVALID_ARGUMENT instead of calling the servicer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError


class Unparsable:
    """Stands for a request message that did not parse."""

    def __init__(self, type_name: str):
        self.message = f"the request is not a valid {type_name} message"


def _parser(cls) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError):
            return Unparsable(cls.DESCRIPTOR.full_name)

    return parse


def _checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, Unparsable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        yield request


def _guarded(behavior: Callable, method: MethodDescriptor) -> Callable:
    if method.client_streaming:
        return lambda requests, context: behavior(_checked(requests, context), context)

    if method.server_streaming:

        def stream(request, context):
            if isinstance(request, Unparsable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            yield from behavior(request, context)

        return stream

    def unary(request, context):
        if isinstance(request, Unparsable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return behavior(request, context)

    return unary


_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def register_servicer(server: grpc.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Serve every method of `service` from the servicer's method of the same name."""
    handlers = {}
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        make = _KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            _guarded(getattr(servicer, method.name), method),
            request_deserializer=_parser(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
