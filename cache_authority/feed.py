"""The Watch feed: a bounded, numbered list of commit summaries that any number of readers follow.

Readers keep their own cursor, so a slow reader never blocks a patch; a reader that falls further
behind than the feed keeps is told so (and the servicer ends its stream) instead of silently
missing commits.

Patches commit in engine threads; the servicer's streams are coroutines on one asyncio loop.
`FeedSignal` bridges the two: each publish schedules one wake-up on the loop
(`call_soon_threadsafe`), which completes the futures of the streams that care (those of the
event's session, and those of every session), so a thousand idle Watch and Sync streams cost no
thread, and a commit costs only the streams it concerns. A read costs O(new events): the feed
keeps a lane per session and reads from the newest end (attack report F2: every waiter woke on
every commit and scanned all 4096 events, O(streams x capacity) per commit on the loop that also
answers Patch).
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


class _Lane:
    """One session's events that the feed still holds, oldest first, and the newest of its
    events the feed dropped (-1: none): a reader of one session reads only these."""

    __slots__ = ("dropped", "events")

    def __init__(self) -> None:
        self.events: deque[tuple[int, WatchEvent]] = deque()
        self.dropped = -1


class Feed:
    def __init__(self, capacity: int = 4096):
        self._cond = threading.Condition()
        self._capacity = capacity
        self._events: deque[tuple[int, WatchEvent]] = deque()
        self._lanes: dict[str, _Lane] = {}  # session -> its events among self._events
        self._next = 0  # sequence number the next event gets
        self._dropped = -1  # sequence number of the newest event dropped (-1: none)
        self._closed = False
        self._subscribers: list[Callable[[str | None], None]] = []

    def cursor(self) -> int:
        """Where a reader starts to see only events published from now on."""
        with self._cond:
            return self._next

    def publish(self, event: WatchEvent) -> None:
        with self._cond:
            entry = (self._next, event)
            self._events.append(entry)
            self._lane(event.session_id).events.append(entry)
            self._next += 1
            if len(self._events) > self._capacity:
                self._drop_oldest()
            self._cond.notify_all()
            subscribers = list(self._subscribers)
        for wake in subscribers:
            wake(event.session_id)

    def _lane(self, session_id: str) -> _Lane:
        lane = self._lanes.get(session_id)
        if lane is None:
            lane = self._lanes[session_id] = _Lane()
        return lane

    def _drop_oldest(self) -> None:
        seq, event = self._events.popleft()
        self._dropped = seq
        lane = self._lanes[event.session_id]
        lane.events.popleft()  # the session's oldest is the feed's oldest of that session
        lane.dropped = seq
        if event.deleted and not lane.events:
            # Its deletion left the feed: forget the lane (a reader that still holds it
            # learns from `dropped` that it fell behind; a new session of that id gets a
            # new lane).
            del self._lanes[event.session_id]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            subscribers = list(self._subscribers)
        for wake in subscribers:
            wake(None)

    def subscribe(self, wake: Callable[[str | None], None]) -> Callable[[], None]:
        """Call `wake(session_id)` (from the publishing thread) after every publish, and
        `wake(None)` on close; returns the function that unsubscribes. `wake` must be quick and
        must not raise."""
        with self._cond:
            self._subscribers.append(wake)

        def unsubscribe() -> None:
            with self._cond, contextlib.suppress(ValueError):
                self._subscribers.remove(wake)

        return unsubscribe

    def lane(self, session_id: str) -> _Lane:
        """The lane a reader of one session passes to `read_nowait` (take it after checking that
        the session exists: a lane lives as long as its session's events do)."""
        with self._cond:
            return self._lane(session_id)

    def read_nowait(self, cursor: int, lane: _Lane | None = None) -> tuple[list[WatchEvent], int]:
        """Events at or after `cursor` (of the lane's session, or of all when None) and the next
        cursor, without waiting (a coroutine waits on its FeedSignal first). LookupError when
        events the reader has not seen were dropped. Costs O(events returned): nothing new
        returns at once."""
        with self._cond:
            if lane is None:
                return self._read(self._events, cursor, self._dropped)
            return self._read(lane.events, cursor, lane.dropped)

    def _read(
        self, events: deque[tuple[int, WatchEvent]], cursor: int, dropped: int
    ) -> tuple[list[WatchEvent], int]:
        if dropped >= cursor:
            raise LookupError(f"watcher fell {dropped - cursor + 1} or more events behind")
        # Newest first from the end, stopping at the first one already read: O(new events).
        new: list[WatchEvent] = []
        for seq, event in reversed(events):
            if seq < cursor:
                break
            new.append(event)
        new.reverse()
        return new, self._next

    @property
    def closed(self) -> bool:
        return self._closed


class FeedSignal:
    """Wakes the coroutines of one asyncio loop when the feed changes: a reader of one session
    only at that session's events (and on close), a reader of all sessions at every event.

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
        self._all: asyncio.Future[None] = loop.create_future()  # readers of every session
        self._sessions: dict[str, asyncio.Future[None]] = {}  # readers of one session
        self._pending: set[str] | None = None  # sessions of a scheduled wake-up (loop thread)
        self._unsubscribe = feed.subscribe(self._wake_threadsafe)

    def changed(self, session_id: str | None = None) -> asyncio.Future[None]:
        """A future that completes at the next change of the feed that concerns `session_id`
        (None: any change)."""
        if session_id is None:
            return self._all
        future = self._sessions.get(session_id)
        if future is None:
            future = self._sessions[session_id] = self._loop.create_future()
        return future

    async def wait(self, changed: asyncio.Future[None]) -> None:
        """Wait until `changed` completes; a cancelled waiter leaves it to the others."""
        await asyncio.wait({changed})

    def close(self) -> None:
        self._unsubscribe()

    def _wake_threadsafe(self, session_id: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop already closed: nobody waits
            self._loop.call_soon_threadsafe(self._schedule, session_id)

    def _schedule(self, session_id: str | None) -> None:
        if self._pending is None:
            self._pending = set()
            if self._delay_s > 0:
                self._loop.call_later(self._delay_s, self._fire)
            else:
                self._loop.call_soon(self._fire)
        self._pending.add("" if session_id is None else session_id)

    def _fire(self) -> None:
        pending, self._pending = self._pending or set(), None
        # "" stands for close (session ids are never empty): every reader wakes.
        names = list(self._sessions) if "" in pending else pending
        for future in [self._all, *(self._sessions.pop(n, None) for n in names)]:
            if future is not None and not future.done():
                future.set_result(None)
        self._all = self._loop.create_future()
