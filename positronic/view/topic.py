"""A value that any number of readers follow: the newest one wins (readers that fall behind skip
to it), and no reader can slow the writer."""

from __future__ import annotations

import asyncio
import json
from typing import Any


class Topic:
    """The latest published value, its sequence number, and a future that completes at the next
    publish. Readers remember the sequence they sent; whatever they missed meanwhile is
    coalesced into the newest value."""

    def __init__(self) -> None:
        self.value: Any = None
        self.seq = 0  # 0: nothing published yet
        self._next: asyncio.Future[None] | None = None
        self._json: str | None = None
        self._frames: dict[str, bytes] = {}

    def publish(self, value: Any) -> None:
        self.value = value
        self.seq += 1
        self._json = None
        self._frames = {}
        if self._next is not None and not self._next.done():
            self._next.set_result(None)
        self._next = None

    def changed(self) -> asyncio.Future[None]:
        """Completes at the next publish (a reader awaits it through asyncio.wait, never
        cancelling it, so that other readers still see it)."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        return self._next

    def json(self) -> str:
        """The value as compact JSON, encoded once per publish however many readers send it."""
        if self._json is None:
            self._json = json.dumps(self.value, ensure_ascii=False, separators=(",", ":"))
        return self._json

    def frame(self, event: str) -> bytes:
        """The value as one server-sent event named `event`, built once per publish: every
        stream sends the same bytes object, so a thousand pages do not hold a thousand
        copies of a big session."""
        frame = self._frames.get(event)
        if frame is None:
            frame = self._frames[event] = sse_frame(event, self.json())
        return frame


def sse_frame(event: str, data: str) -> bytes:
    # JSON escapes every line break inside strings, so one data line carries the object.
    return f"event: {event}\ndata: {data}\n\n".encode()
