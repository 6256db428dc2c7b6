"""Helpers of the live view's tests: the view server in a thread of this process, and a reader
of its server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import queue
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable

from positronic.view.main import ViewConfig, serve


class ViewThread:
    """`positronic view` (the same serve() the command runs) on its own asyncio loop."""

    def __init__(self, config: ViewConfig):
        self._config = config
        self._ready: queue.Queue[str | BaseException] = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        got = self._ready.get(timeout=30)
        if isinstance(got, BaseException):
            raise got
        self.url = got

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self._config, self._ready.put, self._stop)

        try:
            asyncio.run(main())
        except BaseException as e:  # handed to the test thread
            self._ready.put(e)

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive(), "the view server did not stop"


class EventStream:
    """Reads one /events stream in a thread, keeping the newest data of each event name."""

    def __init__(self, base_url: str, session: str | None = None):
        url = urllib.parse.urlsplit(base_url)
        self._conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        path = "/events" + (f"?session={urllib.parse.quote(session)}" if session else "")
        self._conn.request("GET", path, headers={"Accept": "text/event-stream"})
        self.response = self._conn.getresponse()
        self._sock = self._conn.sock
        self.latest: dict[str, dict] = {}  # event name -> its newest data
        self._changed = threading.Condition()
        if self.response.status == 200:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        event = "message"
        try:
            for raw in self.response:
                line = raw.decode("utf-8").rstrip("\n")
                if line.startswith("event: "):
                    event = line[len("event: ") :]
                elif line.startswith("data: "):
                    with self._changed:
                        self.latest[event] = json.loads(line[len("data: ") :])
                        self._changed.notify_all()
        except (OSError, ValueError, AttributeError):
            pass  # closed (http.client drops its file object under a reader: AttributeError)

    def wait_for(
        self, event: str, match: Callable[[dict], bool] = lambda d: True, timeout: float = 60
    ) -> dict:
        """The newest `event` once it matches: what a page reading the stream shows (each
        event is a state, and a page keeps only the newest of each)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                data = self.latest.get(event)
                if data is not None and match(data):
                    return data
                left = deadline - time.monotonic()
                if left <= 0:
                    shown = json.dumps(data)[:300] if data is not None else None
                    raise AssertionError(f"{event!r} never matched; the newest: {shown}")
                self._changed.wait(left)

    def close(self) -> None:
        # Shut the socket first: a reader blocked in it would hold the response's lock until
        # the next ping.
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        self._conn.close()
