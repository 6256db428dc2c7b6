"""The worker's domain error: a gRPC status name, a message, and optional detail messages.

Tensor code raises `WorkerError`; only the servicer turns it into a status (STYLE.md rule 7).
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import Message


class WorkerError(Exception):
    """A refused request. `code` is a gRPC status name accepted by `positronic.rpc.abort`."""

    def __init__(self, code: str, message: str, details: Sequence[Message] = ()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = tuple(details)


def invalid(message: str) -> WorkerError:
    return WorkerError("INVALID_ARGUMENT", message)
