"""DirectStub: async servicer streams as blocking iterators, ended by cancel like a gRPC call."""

from __future__ import annotations

import asyncio
import threading

from positronic.direct import DirectStub


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
