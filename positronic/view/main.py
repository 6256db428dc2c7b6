"""`positronic view`: a web page that shows a session as it runs (or the list of sessions).

The view server is a client of the authority and nothing else: one Watch of every session, and
GetSession / ListSessions to refresh what browsers show. It never mutates anything. The first
line of stdout is the page's URL (so `--listen 127.0.0.1:0` is usable from scripts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from positronic import flags, limits
from positronic.rpc import read_token_file
from positronic.tls import ClientTls
from positronic.view.hub import Hub
from positronic.view.link import AuthorityLink
from positronic.view.server import PageConfig, make_app

logger = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8080"


@dataclass(frozen=True)
class ViewConfig:
    authority: str
    listen: str = DEFAULT_LISTEN  # HOST:PORT of the page; port 0 picks a free one
    session: str | None = None  # what `/` shows; None: the list of sessions
    auth_token: str | None = None  # bearer token for the authority
    tls: ClientTls | None = None
    refresh_hz: float = 4.0  # GetSessions per shown session per second, at most
    max_viewers: int = 64  # pages open at once
    stall_s: float = 30.0  # a page that takes no event for this long is dropped

    def __post_init__(self) -> None:
        if not self.authority:
            raise ValueError("view needs --authority HOST:PORT")
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"--listen must be HOST:PORT, not {limits.clip(self.listen)}")
        if self.session is not None:
            problem = limits.check_session_id(self.session)
            if problem:
                raise ValueError(problem)
        if not 0 < self.refresh_hz <= 50:
            raise ValueError("--refresh-hz must be in (0, 50]")
        if self.max_viewers < 1:
            raise ValueError("--max-viewers must be at least 1")

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--authority", help="HOST:PORT of the authority [POSITRONIC_AUTHORITY]")
    a("--session", help="session to show at / (default: the list of sessions)")
    a("--listen", help=f"HOST:PORT of the page (default {DEFAULT_LISTEN}) [POSITRONIC_VIEW_LISTEN]")
    a("--refresh-hz", type=float, default=4.0, help="page refreshes per second, at most (4)")
    a("--max-viewers", type=int, default=64, help="pages open at once (64)")
    a("--auth-token-file", help="bearer token for the authority [POSITRONIC_AUTH_TOKEN_FILE]")
    flags.add_client_tls_arguments(p)


def config_from(args: argparse.Namespace, environ) -> ViewConfig:
    return ViewConfig(
        authority=flags.pick(args, "authority", "POSITRONIC_AUTHORITY", environ) or "",
        listen=flags.pick(args, "listen", "POSITRONIC_VIEW_LISTEN", environ, DEFAULT_LISTEN)
        or DEFAULT_LISTEN,
        session=args.session or None,
        auth_token=read_token_file(
            flags.pick(args, "auth_token_file", "POSITRONIC_AUTH_TOKEN_FILE", environ)
        ),
        tls=flags.client_tls(args, environ),
        refresh_hz=args.refresh_hz,
        max_viewers=args.max_viewers,
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from(args, os.environ)
    except (ValueError, OSError) as e:
        print(f"view: {e}", file=sys.stderr)
        return 2

    def ready(url: str) -> None:
        print(url, flush=True)

    try:
        asyncio.run(serve(config, ready))
    except OSError as e:
        print(f"view: {e}", file=sys.stderr)
        return 1
    return 0


async def serve(
    config: ViewConfig, ready: Callable[[str], None], stop: asyncio.Event | None = None
) -> None:
    """Serve the page until SIGINT/SIGTERM (or `stop` is set); `ready(url)` once it listens."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    hub = Hub(AuthorityLink(config.authority, config.auth_token, config.tls), config.refresh_hz)
    await hub.start()
    app = make_app(hub, PageConfig(config.session, config.max_viewers, config.stall_s))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        if config.auth_token and config.host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning(
                "the page has no authentication of its own: anyone who reaches %s reads the "
                "sessions the bearer token protects",
                config.listen,
            )
        logger.info("view of %s at http://%s:%d/", config.authority, shown, port)
        ready(f"http://{shown}:{port}/")
        await stop.wait()
    finally:
        await runner.cleanup()
        await hub.close()
