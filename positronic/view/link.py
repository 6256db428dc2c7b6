"""The view server's one connection to the authority: a grpc.aio channel, the bearer token, and
the single Watch of every session that all browsers share, re-opened whenever it breaks.

Read-only by construction: the only RPCs called are Watch, ListSessions and GetSession.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc

from positronic.rpc import CHANNEL_OPTIONS, ROUND_ROBIN, channel_target
from positronic.tls import ClientTls
from positronic.v1 import cache_authority_pb2 as ca
from positronic.v1 import cache_authority_pb2_grpc, session_pb2

logger = logging.getLogger(__name__)

# gRPC's own reconnect backoff grows to two minutes; a page that says "the authority is back"
# two minutes late looks frozen, so the channel retries within seconds.
RECONNECT_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
CALL_TIMEOUT_S = 10.0
# Between two tries to subscribe: a Watch attempt every 2 s costs a down authority nothing,
# and a page shows the authority back within about that long.
MAX_BACKOFF_S = 2.0


@dataclass(frozen=True)
class LinkEvents:
    """What the link tells its owner, in order: connected (with every session), then commits,
    then down (with why); then connected again once the authority answers."""

    connected: Callable[[Sequence[session_pb2.SessionInfo]], None]
    commit: Callable[[ca.WatchResponse], None]
    down: Callable[[str], None]


class AuthorityLink:
    def __init__(self, address: str, auth_token: str | None, tls: ClientTls | None):
        target, host_name = channel_target(address)
        options: list[tuple[str, int | str]] = [
            *CHANNEL_OPTIONS,
            ("grpc.service_config", ROUND_ROBIN),
            *RECONNECT_OPTIONS,
        ]
        if tls is not None:
            name = tls.server_name or host_name
            if name:
                options.append(("grpc.ssl_target_name_override", name))
            self._channel = grpc.aio.secure_channel(target, tls.credentials(), options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        self._stub = cache_authority_pb2_grpc.CacheAuthorityStub(self._channel)
        self.address = address

    async def get_session(self, session_id: str) -> ca.GetSessionResponse:
        return await self._stub.GetSession(
            ca.GetSessionRequest(session_id=session_id),
            timeout=CALL_TIMEOUT_S,
            metadata=self._metadata,
        )

    async def list_sessions(self) -> Sequence[session_pb2.SessionInfo]:
        resp = await self._stub.ListSessions(
            ca.ListSessionsRequest(), timeout=CALL_TIMEOUT_S, metadata=self._metadata
        )
        return list(resp.sessions)

    async def follow(
        self, events: LinkEvents, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> None:
        """Watch every session forever: subscribe, list, stream commits; on any break report
        it and subscribe again (backoff 0.5 s doubling to MAX_BACKOFF_S)."""
        backoff = 0.5
        while True:
            call = self._stub.Watch(ca.WatchRequest(), metadata=self._metadata)
            try:
                # Initial metadata means subscribed: listing after it misses no commit.
                await call.initial_metadata()
                if call.done():  # it failed before subscribing
                    code = await call.code()
                    raise _Down(f"{code.name}: {short(await call.details())}")
                events.connected(await self.list_sessions())
                logger.info("watching every session of %s", self.address)
                backoff = 0.5
                async for commit in call:
                    events.commit(commit)
                raise _Down("the authority ended the Watch stream (shutting down?)")
            except grpc.aio.AioRpcError as e:
                events.down(f"{e.code().name}: {short(e.details())}")
            except _Down as e:
                events.down(str(e))
            except Exception as e:  # a bug in the view: say so, and watch again
                logger.exception("following %s failed", self.address)
                events.down(f"the view failed ({type(e).__name__}); watching again")
            finally:
                call.cancel()
            await sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def close(self) -> None:
        await self._channel.close(grace=None)


class _Down(Exception):
    pass


def short(text: str | None, limit: int = 200) -> str:
    text = text or ""
    return text if len(text) <= limit else text[:limit] + "..."
