"""The Watch feed: a bounded, numbered list of commit summaries that any number of readers follow.

Readers keep their own cursor, so a slow reader never blocks a patch; a reader that falls further
behind than the feed keeps is told so (and the servicer ends its stream) instead of silently
missing commits.

Patches commit in engine threads; the servicer's streams are coroutines on one asyncio loop.
`FeedSignal` bridges the two: each publish schedules one wake-up on the loop
(`call_soon_threadsafe`), which completes a future every waiting stream awaits, so a thousand
idle Watch and Sync streams cost no thread and one callback per commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class WatchEvent:
    """Summary of one committed patch (or of a deletion)."""

    session_id: str
    version: int
    digest: bytes
    request_id: str
    row_count: int
    appended: int
    merged: int
    evicted: int
    committed_unix_ns: int
    deleted: bool = False


class Feed:
    def __init__(self, capacity: int = 4096):
        self._cond = threading.Condition()
        self._events: deque[tuple[int, WatchEvent]] = deque(maxlen=capacity)
        self._next = 0  # sequence number the next event gets
        self._closed = False
        self._subscribers: list[Callable[[], None]] = []

    def cursor(self) -> int:
        """Where a reader starts to see only events published from now on."""
        with self._cond:
            return self._next

    def publish(self, event: WatchEvent) -> None:
        with self._cond:
            self._events.append((self._next, event))
            self._next += 1
            self._cond.notify_all()
            subscribers = list(self._subscribers)
        for wake in subscribers:
            wake()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            subscribers = list(self._subscribers)
        for wake in subscribers:
            wake()

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake()` (from the publishing thread) after every publish and on close; returns
        the function that unsubscribes. `wake` must be quick and must not raise."""
        with self._cond:
            self._subscribers.append(wake)

        def unsubscribe() -> None:
            with self._cond, contextlib.suppress(ValueError):
                self._subscribers.remove(wake)

        return unsubscribe

    def read_nowait(self, cursor: int) -> tuple[list[WatchEvent], int]:
        """Events at or after `cursor` and the next cursor, without waiting (a coroutine waits
        on its FeedSignal first). LookupError when events the reader has not seen were dropped.
        """
        with self._cond:
            return self._read(cursor)

    def _read(self, cursor: int) -> tuple[list[WatchEvent], int]:
        if self._events and self._events[0][0] > cursor:
            raise LookupError(f"watcher fell {self._events[0][0] - cursor} events behind")
        return [e for seq, e in self._events if seq >= cursor], self._next

    @property
    def closed(self) -> bool:
        return self._closed


class FeedSignal:
    """Wakes the coroutines of one asyncio loop whenever the feed changes (publish or close).

    A waiter takes `changed()` *before* it reads the feed and awaits it only when the read found
    nothing: a publish in between has completed that future already, so no commit is missed.
    """

    # Waiters wake this long after a commit, so that the Patch that committed answers first
    # (asyncio runs callbacks in order: woken at once, a thousand watchers' writes would go out
    # before its reply); commits within the delay coalesce into one wake-up. Replica followers
    # (Sync with follow) use delay 0: a worker's next compute call waits on their delta.
    WAKE_DELAY_S = 0.002

    def __init__(self, feed: Feed, loop: asyncio.AbstractEventLoop, delay_s: float = WAKE_DELAY_S):
        self._loop = loop
        self._delay_s = delay_s
        self._future: asyncio.Future[None] = loop.create_future()
        self._pending = False  # a wake-up is scheduled (loop thread only)
        self._unsubscribe = feed.subscribe(self._wake_threadsafe)

    def changed(self) -> asyncio.Future[None]:
        """A future that completes at the next change of the feed."""
        return self._future

    async def wait(self, changed: asyncio.Future[None]) -> None:
        """Wait until `changed` completes; a cancelled waiter leaves it to the others."""
        await asyncio.wait({changed})

    def close(self) -> None:
        self._unsubscribe()

    def _wake_threadsafe(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop already closed: nobody waits
            self._loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        if not self._pending:
            self._pending = True
            if self._delay_s > 0:
                self._loop.call_later(self._delay_s, self._fire)
            else:
                self._loop.call_soon(self._fire)

    def _fire(self) -> None:
        self._pending = False
        if not self._future.done():
            self._future.set_result(None)
        self._future = self._loop.create_future()
