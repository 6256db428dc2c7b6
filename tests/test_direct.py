"""DirectStub: async servicer streams as blocking iterators, ended by cancel like a gRPC call."""

from __future__ import annotations

import asyncio
import threading

from cache_authority.engine import Engine
from cache_authority.metrics import Metrics
from cache_authority.servicer import CacheAuthorityServicer
from positronic.direct import DirectStub, may_block
from tests.authority_fixtures import append_pb, create_request, patch_stream


class _Forever:
    """A servicer whose stream yields one item, then waits for ever (a follow stream)."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    async def Follow(self, request, context):
        try:
            yield request
            await asyncio.Event().wait()
        finally:
            self.closed.set()

    async def Count(self, request, context):
        for i in range(request):
            yield i


def test_a_finite_stream_ends_and_closes():
    assert list(DirectStub(_Forever()).Count(3)) == [0, 1, 2]


def test_cancel_from_another_thread_ends_a_blocked_stream_and_closes_it():
    servicer = _Forever()
    stream = DirectStub(servicer).Follow("first")
    assert next(stream) == "first"
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(stream))  # blocks in the wait
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and not servicer.closed.is_set()
    stream.cancel()
    reader.join(10)
    assert not reader.is_alive() and got == []
    assert servicer.closed.wait(10)  # the generator's finally ran on its loop
    assert list(stream) == []  # a cancelled stream stays ended


def test_a_coroutine_handler_runs_on_the_callers_thread_where_it_may_block():
    class Asker:
        async def Ask(self, request, context):
            await asyncio.sleep(0)  # a real suspension still completes on the caller's loop
            return threading.get_ident(), may_block()

    assert DirectStub(Asker()).Ask(None) == (threading.get_ident(), True)
    assert not may_block()  # only inside the handler


def test_an_in_process_patch_runs_the_engine_on_the_callers_thread():
    """The in-process Patch costs no thread hop: the engine commits on the driver's thread."""
    threads: list[int] = []

    class Recording(Engine):
        def _patch(self, *args):
            threads.append(threading.get_ident())
            return super()._patch(*args)

    servicer = CacheAuthorityServicer(Recording(None, None, Metrics()))
    try:
        authority = DirectStub(servicer)
        authority.CreateSession(create_request("s"))
        reply = authority.Patch(patch_stream("s", 0, "r1", [append_pb(0, [1, 2], seed=1)]))
        assert reply.version == 1 and reply.row_count == 2
        assert threads == [threading.get_ident()]
    finally:
        servicer.close()
