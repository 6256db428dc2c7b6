"""Calling servicers directly, without gRPC: the benchmark's "in_process" mode.

A DirectStub turns `stub.Method(request)` into `servicer.Method(request, context)` with a context
whose abort raises a grpc.RpcError carrying the same code and details, so the loop driver runs
unchanged over it. Only the wire (serialization, HTTP/2, loopback) is left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


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

    def abort(self, code, details):
        raise DirectRpcError(code, details)

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


class DirectStub:
    """stub.Method(request_or_iterator) -> servicer.Method(request_or_iterator, DirectContext())."""

    def __init__(self, servicer: Any, on_call: Callable[[str], None] | None = None):
        self._servicer = servicer
        self._on_call = on_call

    def __getattr__(self, name: str):
        method = getattr(self._servicer, name)

        def call(request, timeout=None, metadata=None):
            if self._on_call is not None:
                self._on_call(name)
            return method(request, DirectContext())

        return call
