"""The Watch feed: a bounded, numbered list of commit summaries that any number of readers follow.

Readers keep their own cursor, so a slow reader never blocks a patch; a reader that falls further
behind than the feed keeps is told so (and the servicer ends its stream) instead of silently
missing commits.
"""

from __future__ import annotations

import threading
from collections import deque
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

    def cursor(self) -> int:
        """Where a reader starts to see only events published from now on."""
        with self._cond:
            return self._next

    def publish(self, event: WatchEvent) -> None:
        with self._cond:
            self._events.append((self._next, event))
            self._next += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def read(self, cursor: int, timeout: float) -> tuple[list[WatchEvent], int]:
        """Events at or after `cursor` (waiting up to `timeout` for one) and the next cursor.

        Raises LookupError when events the reader has not seen were already dropped.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._next > cursor or self._closed, timeout)
            if self._events and self._events[0][0] > cursor:
                raise LookupError(f"watcher fell {self._events[0][0] - cursor} events behind")
            out = [e for seq, e in self._events if seq >= cursor]
            return out, self._next

    @property
    def closed(self) -> bool:
        return self._closed
