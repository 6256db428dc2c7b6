"""The worker's client of the cache authority: only `Sync` (the worker never writes): pulls with
a deadline, and follow streams (one per followed session, no deadline, ended by cancel)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import grpc

from model_worker.errors import WorkerError
from positronic.rpc import open_channel
from positronic.tls import ClientTls
from positronic.v1 import cache_authority_pb2, cache_authority_pb2_grpc

logger = logging.getLogger(__name__)

_UNREACHABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
}


class AuthoritySync:
    """A SyncSource over gRPC. Authority errors become WorkerErrors: NOT_FOUND stays NOT_FOUND;
    an authority that cannot be reached (or refuses our credentials) is UNAVAILABLE."""

    def __init__(
        self,
        address: str,
        auth_token: str | None = None,
        timeout_s: float = 120.0,
        tls: ClientTls | None = None,
    ):
        self.address = address
        self._channel = open_channel(address, auth_token, tls=tls)
        self._stub = cache_authority_pb2_grpc.CacheAuthorityStub(self._channel)
        self._timeout_s = timeout_s

    def sync(
        self, session_id: str, from_version: int
    ) -> Iterable[cache_authority_pb2.SyncResponse]:
        request = cache_authority_pb2.SyncRequest(
            session_id=session_id, from_version=from_version, follow=False
        )
        call = self._stub.Sync(request, timeout=self._timeout_s)
        return _Translated(call, self.address, session_id)

    def follow(self, session_id: str, from_version: int) -> _Translated:
        """Sync(follow=True): the deltas after from_version, then every commit as it lands,
        until cancel() or the session is deleted (NOT_FOUND)."""
        request = cache_authority_pb2.SyncRequest(
            session_id=session_id, from_version=from_version, follow=True
        )
        return _Translated(self._stub.Sync(request), self.address, session_id)

    def close(self) -> None:
        self._channel.close()


class _Translated:
    """Iterates a Sync call, turning gRPC errors into WorkerErrors; cancel() ends the call."""

    def __init__(self, call, address: str, session_id: str):
        self._call = call
        self._address = address
        self._session_id = session_id

    def __iter__(self) -> Iterator[cache_authority_pb2.SyncResponse]:
        try:
            yield from self._call
        except grpc.RpcError as e:
            code = e.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.CANCELLED:
                return
            detail = e.details()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.NOT_FOUND:
                raise WorkerError("NOT_FOUND", detail or f"no session {self._session_id}") from None
            if code in _UNREACHABLE:
                raise WorkerError(
                    "UNAVAILABLE", f"authority {self._address} unreachable: {code.name} {detail}"
                ) from None
            raise WorkerError(
                "ABORTED",
                f"authority {self._address} refused Sync of {self._session_id}: "
                f"{code.name} {detail}",
            ) from None

    def cancel(self) -> None:
        self._call.cancel()
