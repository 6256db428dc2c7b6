"""gRPC servicer of positronic.v1.CacheAuthority (grpc.aio): proto in -> engine call -> proto out.

Every handler is a coroutine on the server's event loop; whatever can block (a patch's apply and
fsync, a snapshot, anything that takes a session lock) runs in the engine's thread pool, so a
stream that waits holds no thread. Errors become statuses in one place, boundary.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from cache_authority import admission
from cache_authority.boundary import abort_for, streaming, unary
from cache_authority.convert import (
    budget_from_pb,
    geometry_from_pb,
    mirror_to_pb,
    session_info_to_pb,
)
from cache_authority.engine import Engine, SyncPlan
from cache_authority.feed import FeedSignal
from cache_authority.ops import PatchError, Status
from cache_authority.sync import delta_messages, snapshot_messages
from positronic import codec
from positronic.direct import may_block
from positronic.limits import clip
from positronic.v1 import cache_authority_pb2 as ca
from positronic.v1 import cache_authority_pb2_grpc

logger = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_NAME = ca.DESCRIPTOR.services_by_name["CacheAuthority"].full_name
# A Patch up to this size, on an authority without a data directory, commits on the event loop
# when no lock is taken: a per-token patch (TinyLlama's fp32 row is 45 KB, a merge doubles it);
# a prime of many rows still goes to the pool, not to stall every stream for its copy.
INLINE_PATCH_BYTES = 256 << 10


def _invalid(message: str) -> PatchError:
    return PatchError(Status.INVALID_ARGUMENT, message)


class CacheAuthorityServicer(cache_authority_pb2_grpc.CacheAuthorityServicer):
    def __init__(
        self,
        engine: Engine,
        *,
        engine_threads: int = 16,
        stream_limits: admission.StreamLimits | None = None,
    ):
        self.engine = engine
        self.streams = admission.StreamTable(stream_limits)
        self._pool = ThreadPoolExecutor(engine_threads, thread_name_prefix="authority-engine")
        self._signals: dict[tuple[asyncio.AbstractEventLoop, bool], FeedSignal] = {}

    def close(self) -> None:
        for signal in self._signals.values():
            signal.close()
        self._pool.shutdown(wait=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the engine's thread pool: the event loop never blocks on a lock or disk.
        Inline when the caller's own thread runs this handler (in-process, DirectStub): there
        the loop serves this one call, and the two thread hops would be the Patch's largest
        cost."""
        if may_block():
            return fn(*args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def _signal(self, immediate: bool = False) -> FeedSignal:
        """The loop's feed signal; `immediate` for replica followers (no wake-up delay: the
        worker's next call on the session waits for their delta)."""
        loop = asyncio.get_running_loop()
        signal = self._signals.get((loop, immediate))
        if signal is None:
            delay = 0.0 if immediate else FeedSignal.WAKE_DELAY_S
            signal = self._signals[(loop, immediate)] = FeedSignal(self.engine.feed, loop, delay)
        return signal

    # -- unary ------------------------------------------------------------------------------
    @unary
    async def CreateSession(self, request: ca.CreateSessionRequest, context):
        admission.check_session_id(request.session_id, allow_empty=True)
        admission.check_geometry_fields(request.geometry)
        try:
            geometry = geometry_from_pb(request.geometry)
            budget = budget_from_pb(request.budget)
        except ValueError as e:
            raise _invalid(f"CreateSession: {e}") from None
        seed = request.seed_brightness if request.HasField("seed_brightness") else None
        info = await self._call(
            self.engine.create_session,
            request.session_id,
            geometry,
            budget,
            seed,
            session_info_to_pb,
        )
        return ca.CreateSessionResponse(session=info)

    @unary
    async def GetSession(self, request: ca.GetSessionRequest, context):
        response = await self._call(
            self.engine.read,
            request.session_id,
            lambda s: ca.GetSessionResponse(session=session_info_to_pb(s), mirror=mirror_to_pb(s)),
        )
        self.engine.metrics.add_bytes_out(response.ByteSize())
        return response

    @unary
    async def ListSessions(self, request, context) -> ca.ListSessionsResponse:
        return ca.ListSessionsResponse(
            sessions=await self._call(self.engine.read_all, session_info_to_pb)
        )

    @unary
    async def DeleteSession(self, request: ca.DeleteSessionRequest, context):
        version = await self._call(self.engine.delete_session, request.session_id)
        return ca.DeleteSessionResponse(final_version=version)

    # -- Patch: a client stream that commits only at its end_of_patch -----------------------
    async def Patch(self, request_iterator, context) -> ca.PatchResponse:
        expected: int | None = None
        try:
            with self.streams.open(context.peer()) as ticket:
                header, ops, size = await self._read_patch(request_iterator, ticket)
                session_id, expected, request_id = header
                result = None
                if self.engine.store is None and size <= INLINE_PATCH_BYTES:
                    # No disk to wait for and little to copy: commit here on the loop when no
                    # lock is taken (try_patch never waits). The engine's Python holds the GIL
                    # in a pool thread too, so the loop gains little from the hop, and the hop
                    # (two thread wake-ups) was ~1-3 ms of a per-token Patch on 2 busy cores.
                    result = self.engine.try_patch(
                        session_id, expected, request_id, ops, admission.max_ops
                    )
                if result is None:
                    result = await self._call(
                        self.engine.patch, session_id, expected, request_id, ops, admission.max_ops
                    )
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:  # the client cancelled, vanished or ran out of time
            logger.debug(
                "Patch from %s: stream broken before its end; nothing committed", context.peer()
            )
            raise
        except Exception as e:
            await abort_for(context, "Patch", e, expected)
            raise AssertionError("unreachable") from e  # abort raised
        return ca.PatchResponse(
            version=result.version,
            digest=result.digest,
            row_count=result.row_count,
            replayed=result.replayed,
            apply_ns=result.apply_ns,
            durable=result.durable,
        )

    async def _read_patch(self, request_iterator, ticket: admission.StreamTicket):
        """Every message up to the one with end_of_patch: (header, ops, bytes). A stream that ends
        without it is INVALID_ARGUMENT; one that breaks or is cancelled ends this coroutine
        (CancelledError); either way nothing reaches the engine."""
        header: tuple[str, int, str] | None = None
        ops: list = []
        size = 0
        byte_limit = op_limit = 0
        async for msg in request_iterator:
            size += msg.ByteSize()
            this = (msg.session_id, msg.expected_version, msg.request_id)
            if header is None:
                admission.check_patch_header(msg)
                header = this
                ticket.join(msg.session_id)
                if not msg.end_of_patch:  # a stream: learn the session's limits first
                    byte_limit, op_limit = await self._call(self._limits, msg.session_id)
            elif this != ("", 0, "") and this != header:
                raise _invalid("a later Patch message carries a different header")
            if byte_limit and size > byte_limit:
                self.engine.metrics.add_bytes_in(size)
                raise PatchError(
                    Status.RESOURCE_EXHAUSTED,
                    f"patch stream passed {byte_limit} bytes, more than this session can hold",
                )
            admission.check_op_fields(msg.ops, len(ops))
            ops.extend(msg.ops)
            if op_limit and len(ops) > op_limit:
                raise PatchError(
                    Status.RESOURCE_EXHAUSTED,
                    f"patch stream carries over {op_limit} ops, more than this session can use",
                )
            if msg.end_of_patch:
                self.engine.metrics.add_bytes_in(size)
                return header, ops, size
        self.engine.metrics.add_bytes_in(size)
        if header is None:
            raise _invalid("empty Patch stream")
        raise _invalid(
            "the Patch stream ended without a message with end_of_patch = true; nothing committed"
        )

    def _limits(self, session_id: str) -> tuple[int, int]:
        """(bytes, ops) a patch of this session may carry (engine thread)."""
        hard_max = self.engine.read(session_id, lambda s: s.budget.hard_max_rows)
        return self.engine.patch_byte_limit(session_id), admission.max_ops(hard_max)

    # -- server streams ---------------------------------------------------------------------
    @streaming
    async def Sync(self, request: ca.SyncRequest, context) -> AsyncIterator[ca.SyncResponse]:
        if request.from_version < 0 or request.max_chunk_bytes < 0:
            raise _invalid("from_version and max_chunk_bytes must not be negative")
        admission.check_session_id(request.session_id)
        chunk = min(request.max_chunk_bytes or codec.MAX_CHUNK_BYTES, codec.MAX_CHUNK_BYTES)
        sid = request.session_id
        with self.streams.open(context.peer(), sid):
            signal = self._signal(immediate=True)
            feed = self.engine.feed
            cursor = feed.cursor()  # before the plan: a commit in between is planned again
            plan = await self._call(self.engine.sync_plan, sid, request.from_version)
            for msg in self._messages(plan, chunk):
                yield msg
            version = plan.version
            lane = feed.lane(sid) if request.follow else None  # after the plan: sid exists
            while lane is not None:
                changed = signal.changed(sid)
                try:
                    events, cursor = feed.read_nowait(cursor, lane)
                    relevant = feed.closed or bool(events)
                except LookupError:  # fell behind the feed: just look
                    cursor, relevant = feed.cursor(), True
                if not relevant:
                    await signal.wait(changed)
                    continue
                # Deltas ready now are planned here on the loop (no lock to wait for): the
                # replica's next Tick waits for this delta, and a pool hop is ~0.2-1 ms of it.
                ready = self.engine.sync_plan_nowait(sid, version, True)
                if ready is None:
                    ready = await self._call(self.engine.sync_plan, sid, version, True)
                plan = ready
                for msg in self._messages(plan, chunk):
                    yield msg
                version = plan.version

    def _messages(self, plan: SyncPlan, chunk: int):
        if plan.snapshot is not None:
            messages = snapshot_messages(*plan.snapshot, max_chunk_bytes=chunk)
        else:
            messages = (m for c in plan.deltas for m in delta_messages(c.patch, chunk))
        for msg in messages:
            self.engine.metrics.add_bytes_out(msg.ByteSize())
            yield msg

    @streaming
    async def Watch(self, request: ca.WatchRequest, context) -> AsyncIterator[ca.WatchResponse]:
        sid = request.session_id
        admission.check_session_id(sid, allow_empty=True)
        backlog_from = request.from_version if request.HasField("from_version") else None
        if backlog_from is not None and backlog_from < 0:
            raise _invalid(f"from_version {clip(backlog_from)} must not be negative")
        with self.streams.open(context.peer(), sid, every_session=not sid):
            if sid:
                await self._call(self.engine.read, sid, lambda s: None)  # NOT_FOUND now
            signal = self._signal()
            feed = self.engine.feed
            lane = feed.lane(sid) if sid else None  # this session's events only
            cursor = feed.cursor()  # before the backlog: a commit in between shows twice
            # Initial metadata tells a client that waits for it that it is subscribed: every
            # commit from here on reaches it.
            await context.send_initial_metadata(())
            sent: dict[str, int] = {}  # session -> newest version sent, to drop those repeats
            if backlog_from is not None:
                sessions = [sid] if sid else await self._call(self.engine.session_ids)
                for name in sessions:
                    sent[name] = backlog_from  # only versions after it, even ones still to come
                    try:
                        backlog = await self._call(self.engine.retained_events, name, backlog_from)
                    except PatchError:
                        continue  # deleted meanwhile; the feed reports it
                    for event in backlog:
                        sent[name] = event.version
                        yield _watch_pb(event)
            while not feed.closed:
                changed = signal.changed(sid or None)
                try:
                    events, cursor = feed.read_nowait(cursor, lane)
                except LookupError as e:
                    raise PatchError(
                        Status.ABORTED, f"{e}; watch again with from_version"
                    ) from None
                if not events:
                    await signal.wait(changed)
                    continue
                for event in events:
                    if sid and event.session_id != sid:
                        continue
                    if event.deleted:
                        sent.pop(event.session_id, None)  # a new session may reuse the id
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
