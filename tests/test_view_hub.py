"""The view's hub against a scripted authority link: however many commits land and however many
browsers look, a shown session costs at most one GetSession in flight, and commits that arrive
meanwhile are coalesced into the next one."""

from __future__ import annotations

import asyncio

import grpc

from positronic.v1 import cache_authority_pb2 as ca
from positronic.v1 import session_pb2
from positronic.view.hub import Hub
from tests.test_view_render import entry, response


class ScriptedLink:
    """Stands in for AuthorityLink: GetSession answers only when the test releases it."""

    address = "scripted:0"

    def __init__(self) -> None:
        self.get_calls = 0
        self.release = asyncio.Event()
        self.version = 1
        self.error: grpc.StatusCode | None = None  # what GetSession fails with, if anything

    async def get_session(self, session_id: str) -> ca.GetSessionResponse:
        self.get_calls += 1
        await self.release.wait()
        self.release.clear()
        if self.error is not None:
            raise grpc.aio.AioRpcError(self.error, details="x" * 10_000)
        rows = [entry(i, 10 + i, f"▁t{i}", created=1) for i in range(3)]
        return response(self.version, rows)

    async def list_sessions(self):
        return []

    async def follow(self, events) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        pass


def commit(version: int, deleted: bool = False) -> ca.WatchResponse:
    return ca.WatchResponse(
        session_id="s", version=version, row_count=3, appended=1, deleted=deleted
    )


async def until(condition, what: str) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never: {what}")


def test_commits_during_a_refresh_coalesce_into_one_more_and_browsers_share_it():
    async def scenario():
        link = ScriptedLink()
        hub = Hub(link, refresh_hz=50)  # type: ignore[arg-type]
        hub._connected([session_pb2.SessionInfo(session_id="s", version=1, row_count=3)])
        async with hub.viewing("s") as w, hub.viewing("s"), hub.viewing("s"):
            await until(lambda: link.get_calls == 1, "the first GetSession")
            for v in range(2, 102):  # 100 commits while that GetSession is out
                hub._commit(commit(v))
            link.release.set()
            await until(lambda: w.topic.seq == 1, "the first snapshot published")
            await until(lambda: link.get_calls == 2, "one GetSession for the 100 commits")
            link.version = 101
            link.release.set()
            await until(lambda: w.topic.seq == 2, "the second snapshot")
            await asyncio.sleep(0.1)  # 5 refresh intervals: nothing more is asked for
            assert link.get_calls == 2
            assert w.topic.value["version"] == 101
            assert w.topic.value["tokens"][0]["text"] == " t0"
            assert w.viewers == 3 and hub.sessions["s"].refresher is not None
        assert hub.sessions["s"].refresher is None  # nobody looks: no more refreshing
        await hub.close()

    asyncio.run(scenario())


def test_a_deletion_is_published_at_once_without_asking_the_authority():
    async def scenario():
        link = ScriptedLink()
        hub = Hub(link, refresh_hz=50)  # type: ignore[arg-type]
        async with hub.viewing("s") as w:
            await until(lambda: link.get_calls == 1, "the first GetSession")
            link.release.set()
            await until(lambda: w.topic.seq == 1, "the first snapshot")
            hub._commit(commit(7, deleted=True))
            assert w.topic.value["state"] == "deleted" and w.topic.value["version"] == 7
            assert w.topic.value["tokens"]  # the last rows seen stay on the page
            await asyncio.sleep(0.1)
            assert link.get_calls == 1
            hub._commit(commit(1))  # a new session under the same id
            assert w.state == "live"
        assert "s" not in hub.sessions or hub.sessions["s"].viewers == 0
        await hub.close()

    asyncio.run(scenario())


def test_the_link_status_is_published_with_since_when():
    async def scenario():
        hub = Hub(ScriptedLink(), refresh_hz=4)  # type: ignore[arg-type]
        assert hub.status.value["state"] == "connecting"
        hub._down("UNAVAILABLE: connection refused")
        down = hub.status.value
        hub._down("UNAVAILABLE: connection refused")
        assert hub.status.value is down  # the same news is not news
        hub._down("UNAVAILABLE: still refused")
        assert hub.status.value["since_unix_s"] == down["since_unix_s"]
        hub._connected([])
        assert hub.status.value["state"] == "live"
        await hub.close()

    asyncio.run(scenario())


def test_a_session_the_authority_cannot_send_says_why_and_is_read_again():
    async def scenario():
        link = ScriptedLink()
        hub = Hub(link, refresh_hz=50)  # type: ignore[arg-type]
        hub._connected([session_pb2.SessionInfo(session_id="s", version=1, row_count=3)])
        async with hub.viewing("s") as w:
            await until(lambda: link.get_calls == 1, "the first GetSession")
            link.release.set()
            await until(lambda: w.topic.seq == 1, "the first snapshot")
            assert w.topic.value["problem"] is None
            link.error = grpc.StatusCode.RESOURCE_EXHAUSTED  # e.g. over the message limit
            hub._commit(commit(2))
            await until(lambda: link.get_calls == 2, "the second GetSession")
            link.release.set()
            await until(lambda: w.topic.seq == 2, "the failure published")
            problem = w.topic.value["problem"]
            assert problem.startswith("GetSession failed: RESOURCE_EXHAUSTED: xxx")
            assert len(problem) < 300  # the authority's message, cut short
            assert w.topic.value["tokens"]  # the last rows seen stay on the page
            link.error, link.version = None, 2
            hub._commit(commit(3))  # the next commit (or RETRY_S) reads it again
            await until(lambda: link.get_calls == 3, "the third GetSession")
            link.release.set()
            await until(lambda: w.topic.seq == 3, "the recovery published")
            assert w.topic.value["problem"] is None and w.topic.value["version"] == 2
        await hub.close()

    asyncio.run(scenario())
