"""gRPC servicer of positronic.v1.CacheAuthority: proto in -> engine call -> proto out.

Errors map to status codes here and only here: a PatchError carries its code (ABORTED with a
VersionConflict detail); anything else is a bug, logged with its traceback and sent as INTERNAL.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator

import grpc

from cache_authority.convert import (
    budget_from_pb,
    geometry_from_pb,
    mirror_to_pb,
    session_info_to_pb,
)
from cache_authority.engine import Engine, SyncPlan
from cache_authority.ops import PatchError, Status
from cache_authority.sync import delta_messages, snapshot_messages
from positronic import codec, rpc
from positronic.v1 import cache_authority_pb2 as ca
from positronic.v1 import cache_authority_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = ca.DESCRIPTOR.services_by_name["CacheAuthority"].full_name
POLL_S = 0.5  # how often a following stream checks that its client is still there


def _abort(context: grpc.ServicerContext, method: str, error: BaseException) -> None:
    if isinstance(error, PatchError):
        logger.debug("%s refused: %s %s", method, error.status.value, error.message)
        if error.status is Status.CANCELLED:  # no rich status: nobody is there to read it
            context.abort(grpc.StatusCode.CANCELLED, error.message)
        details = []
        if error.status is Status.ABORTED and error.current_version is not None:
            details.append(ca.VersionConflict(current_version=error.current_version))
        rpc.abort(context, error.status.value, error.message, details)
        return  # abort raised already; this line only documents that
    logger.error("%s failed with a bug", method, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error ({type(error).__name__})")


def _unary(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except Exception as e:  # aborting inside the try would be caught here as a bug
            error = e
        _abort(context, fn.__name__, error)

    return wrapper


def _streaming(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            yield from fn(self, request, context)
            return
        except Exception as e:  # GeneratorExit (client gone) is not an Exception: it passes
            error = e
        _abort(context, fn.__name__, error)

    return wrapper


def _until_cancelled(requests: Iterator) -> Iterator:
    """The messages of a client stream. A client that cancels midway (or whose stream breaks)
    makes grpc raise a bare RpcError from the iterator: that is CANCELLED, not a bug."""
    try:
        yield from requests
    except grpc.RpcError:
        raise PatchError(
            Status.CANCELLED, "the client cancelled the stream before its end; nothing committed"
        ) from None


def _invalid(message: str) -> PatchError:
    return PatchError(Status.INVALID_ARGUMENT, message)


class CacheAuthorityServicer(cache_authority_pb2_grpc.CacheAuthorityServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    @_unary
    def CreateSession(self, request: ca.CreateSessionRequest, context) -> ca.CreateSessionResponse:
        try:
            geometry = geometry_from_pb(request.geometry)
            budget = budget_from_pb(request.budget)
        except ValueError as e:
            raise _invalid(f"CreateSession: {e}") from None
        info = self.engine.create_session(
            request.session_id, geometry, budget, request.seed_brightness, session_info_to_pb
        )
        return ca.CreateSessionResponse(session=info)

    @_unary
    def Patch(self, request_iterator, context) -> ca.PatchResponse:
        header: tuple[str, int, str] | None = None
        ops = []
        size = limit = 0
        for msg in _until_cancelled(request_iterator):
            size += msg.ByteSize()
            this = (msg.session_id, msg.expected_version, msg.request_id)
            if header is None:
                if not msg.session_id:
                    raise _invalid("the first Patch message must name the session")
                header = this
                limit = self.engine.patch_byte_limit(msg.session_id)
            elif this != ("", 0, "") and this != header:
                raise _invalid("a later Patch message carries a different header")
            if size > limit:
                self.engine.metrics.add_bytes_in(size)
                raise PatchError(
                    Status.RESOURCE_EXHAUSTED,
                    f"patch stream passed {limit} bytes, more than this session can hold",
                )
            ops.extend(msg.ops)
        self.engine.metrics.add_bytes_in(size)
        if header is None:
            raise _invalid("empty Patch stream")
        session_id, expected_version, request_id = header
        result = self.engine.patch(session_id, expected_version, request_id, ops)
        return ca.PatchResponse(
            version=result.version,
            digest=result.digest,
            row_count=result.row_count,
            replayed=result.replayed,
            apply_ns=result.apply_ns,
            durable=result.durable,
        )

    @_unary
    def GetSession(self, request: ca.GetSessionRequest, context) -> ca.GetSessionResponse:
        response = self.engine.read(
            request.session_id,
            lambda s: ca.GetSessionResponse(session=session_info_to_pb(s), mirror=mirror_to_pb(s)),
        )
        self.engine.metrics.add_bytes_out(response.ByteSize())
        return response

    @_unary
    def ListSessions(self, request, context) -> ca.ListSessionsResponse:
        return ca.ListSessionsResponse(sessions=self.engine.read_all(session_info_to_pb))

    @_unary
    def DeleteSession(self, request: ca.DeleteSessionRequest, context):
        return ca.DeleteSessionResponse(
            final_version=self.engine.delete_session(request.session_id)
        )

    @_streaming
    def Sync(self, request: ca.SyncRequest, context) -> Iterator[ca.SyncResponse]:
        if request.from_version < 0 or request.max_chunk_bytes < 0:
            raise _invalid("from_version and max_chunk_bytes must not be negative")
        chunk = min(request.max_chunk_bytes or codec.MAX_CHUNK_BYTES, codec.MAX_CHUNK_BYTES)
        sid = request.session_id
        plan = self.engine.sync_plan(sid, request.from_version)
        yield from self._send(plan, chunk)
        cursor = plan.version
        while request.follow and context.is_active():
            if self.engine.wait_for_version(sid, cursor, POLL_S):
                plan = self.engine.sync_plan(sid, cursor, holds_state=True)
                yield from self._send(plan, chunk)
                cursor = plan.version

    def _send(self, plan: SyncPlan, chunk: int) -> Iterator[ca.SyncResponse]:
        if plan.snapshot is not None:
            messages = snapshot_messages(*plan.snapshot, max_chunk_bytes=chunk)
        else:
            messages = (m for c in plan.deltas for m in delta_messages(c.patch, chunk))
        for msg in messages:
            self.engine.metrics.add_bytes_out(msg.ByteSize())
            yield msg

    @_streaming
    def Watch(self, request: ca.WatchRequest, context) -> Iterator[ca.WatchResponse]:
        sid = request.session_id
        if sid:
            self.engine.read(sid, lambda s: None)  # NOT_FOUND now, not silence
        cursor = self.engine.feed.cursor()  # before the backlog: a commit in between shows twice
        # Initial metadata now tells a client that waits for it that it is subscribed: every
        # commit from here on reaches it.
        context.send_initial_metadata(())
        sent: dict[str, int] = {}  # session -> newest version sent, to drop those repeats
        sessions = [sid] if sid else self.engine.session_ids()
        if request.from_version > 0:
            for name in sessions:
                try:
                    backlog = self.engine.retained_events(name, request.from_version)
                except PatchError:
                    continue  # deleted meanwhile; the feed reports it
                for event in backlog:
                    sent[name] = event.version
                    yield _watch_pb(event)
        while context.is_active() and not self.engine.feed.closed:
            try:
                events, cursor = self.engine.feed.read(cursor, POLL_S)
            except LookupError as e:
                raise PatchError(Status.ABORTED, f"{e}; watch again with from_version") from None
            for event in events:
                if sid and event.session_id != sid:
                    continue
                if event.deleted:
                    sent.pop(event.session_id, None)  # a new session may reuse the id from v0
                elif event.version <= sent.get(event.session_id, -1):
                    continue
                yield _watch_pb(event)
                if sid and event.deleted:
                    return


def _watch_pb(e) -> ca.WatchResponse:
    return ca.WatchResponse(
        session_id=e.session_id,
        version=e.version,
        digest=e.digest,
        request_id=e.request_id,
        row_count=e.row_count,
        appended=e.appended,
        merged=e.merged,
        evicted=e.evicted,
        committed_unix_ns=e.committed_unix_ns,
        deleted=e.deleted,
    )
