"""The view's HTTP side (aiohttp): the page, its static files, and one server-sent-event stream
per browser, each reading the hub's topics.

Routes: `/` the page; `/static/...` its script and style (served from the package, no build
step); `/events?session=ID` the stream of one session (without `session`, and without
`--session`, the stream of the session list). Each stream carries named events whose data is
one JSON object: `hello` (what the stream shows), `status` (the authority link: connecting,
live or down, with why and since when), `session` or `sessions`, and `ping` every
PING_S seconds so that the page can tell a silent server from a quiet session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from aiohttp import web

from positronic import limits
from positronic.view.hub import Hub
from positronic.view.topic import Topic, sse_frame

logger = logging.getLogger(__name__)

PING_S = 10.0
RETRY_MS = 1000  # how soon a browser's EventSource reconnects after losing the stream


@dataclass(frozen=True)
class PageConfig:
    default_session: str | None  # --session: what `/` shows
    max_viewers: int  # event streams open at once; one more is 503
    stall_s: float = 30.0  # a page that takes longer than this to take one event is dropped


HUB = web.AppKey("hub", Hub)
CONFIG = web.AppKey("config", PageConfig)
STREAMS = web.AppKey("streams", set[asyncio.Task])
CLOSING = web.AppKey("closing", asyncio.Event)


def static_dir() -> Path:
    return Path(str(resources.files("positronic.view") / "static"))


def make_app(hub: Hub, config: PageConfig) -> web.Application:
    app = web.Application()
    app[HUB] = hub
    app[CONFIG] = config
    app[STREAMS] = set()
    app[CLOSING] = asyncio.Event()
    app.router.add_get("/", _index)
    app.router.add_get("/events", _events)
    app.router.add_static("/static/", static_dir())
    app.on_shutdown.append(_close_streams)
    return app


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(static_dir() / "index.html", headers={"Cache-Control": "no-cache"})


async def _events(request: web.Request) -> web.StreamResponse:
    app = request.app
    hub, config = app[HUB], app[CONFIG]
    session_id = request.query.get("session") or config.default_session or ""
    if session_id:
        problem = limits.check_session_id(session_id)
        if problem:
            raise web.HTTPBadRequest(text=problem)
    if len(app[STREAMS]) >= config.max_viewers:
        raise web.HTTPServiceUnavailable(
            text=f"this view serves at most {config.max_viewers} pages at once"
        )
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    task = asyncio.current_task()
    assert task is not None  # a request handler runs in a task
    app[STREAMS].add(task)
    hello = {"session": session_id or None, "authority": hub.link.address}
    send = _Sender(resp, config.stall_s)
    try:
        await resp.prepare(request)  # the browser may be gone already (it navigated away)
        await send(f"retry: {RETRY_MS}\n\n".encode())
        await send(sse_frame("hello", json.dumps(hello)))
        if session_id:
            async with hub.viewing(session_id) as watched:
                await _stream(send, {"status": hub.status, "session": watched.topic}, app)
        else:
            await _stream(send, {"status": hub.status, "sessions": hub.session_list}, app)
    except (ConnectionError, asyncio.CancelledError):
        pass  # the browser went away, or the server is stopping
    except TimeoutError:
        # A page that stopped reading (a stuck client, a dead network path) holds a slot and
        # a frame's worth of buffer: drop it. A live browser's EventSource reconnects.
        logger.info("dropped a page that took no event for %.0f s", config.stall_s)
        if request.transport is not None:
            request.transport.abort()
    finally:
        app[STREAMS].discard(task)
    return resp


class _Sender:
    """Writes to one stream; a write that cannot finish within `stall_s` (the page's socket
    and the transport's buffer are full) raises TimeoutError."""

    def __init__(self, resp: web.StreamResponse, stall_s: float):
        self._resp = resp
        self._stall_s = stall_s

    async def __call__(self, data: bytes) -> None:
        await asyncio.wait_for(self._resp.write(data), self._stall_s)


async def _stream(send: _Sender, topics: dict[str, Topic], app: web.Application):
    """Send each topic whenever it changes (the newest value only), and a ping when all are
    quiet, until the browser leaves or the server stops."""
    sent = dict.fromkeys(topics, 0)
    closing = app[CLOSING]
    while not closing.is_set():
        for name, topic in topics.items():
            if topic.seq != sent[name]:
                sent[name] = topic.seq
                await send(topic.frame(name))
        waits = {topic.changed() for topic in topics.values()}
        done, _ = await asyncio.wait(waits, timeout=PING_S, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            await send(sse_frame("ping", json.dumps({"unix_s": round(time.time(), 3)})))


async def _close_streams(app: web.Application) -> None:
    app[CLOSING].set()
    open_streams: set[asyncio.Task] = app[STREAMS]
    streams = list(open_streams)
    for task in streams:
        task.cancel()
    with contextlib.suppress(Exception):
        await asyncio.gather(*streams, return_exceptions=True)
