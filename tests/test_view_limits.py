"""`positronic view` under abuse, against a real authority (in this process): many pages at once,
a page that never reads, session ids no authority would hold, a session too big to draw whole,
an authority that comes back without its data, and a bug in the view's own Watch handling. The
view server keeps serving through all of them, with bounded memory and a clear word to the page.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import urllib.parse

import pytest

from cache_authority.server import AuthorityConfig, start_authority
from positronic import rpc
from positronic.v1 import cache_authority_pb2 as ca
from positronic.view.hub import MAX_SHOWN_ROWS
from positronic.view.link import AuthorityLink, LinkEvents
from positronic.view.main import ViewConfig
from tests.authority_fixtures import (
    append_pb,
    create_request,
    patch_stream,
    replace_pb,
    running_authority,
    stub,
)
from tests.loop_fixtures import free_port
from tests.view_fixtures import EventStream, ViewThread

ANY = "127.0.0.1:0"
VOCAB = 50  # tiny_geometry's


def ids(n: int) -> list[int]:
    return [i % VOCAB for i in range(n)]


def append_one(client, session_id: str, version: int, rows: int) -> None:
    """Commit version+1 of `session_id`: one more row after its `rows`."""
    op = append_pb(rows, [version % VOCAB], version + 1)
    client.Patch(patch_stream(session_id, version, f"r{version}", [op]))


def test_fifty_pages_at_once_share_the_one_watch_and_all_follow():
    with running_authority() as (server, channel):
        client = stub(channel)
        client.CreateSession(create_request("s", hard_max=64))
        client.Patch(patch_stream("s", 0, "prime", [append_pb(0, [1, 2], 1)]))
        view = ViewThread(ViewConfig(f"127.0.0.1:{server.port}", ANY, refresh_hz=20))
        pages = [EventStream(view.url, "s") for _ in range(40)]
        lists = [EventStream(view.url) for _ in range(10)]
        try:
            assert all(p.response.status == 200 for p in (*pages, *lists))
            assert server.servicer.streams.open_count() == 1
            for v in range(1, 6):
                append_one(client, "s", v, rows=v + 1)
            for page in pages:
                assert page.wait_for("session", lambda d: d["version"] == 6)["rows"] == 7
            for page in lists:
                page.wait_for("sessions", lambda d: d["sessions"][0]["version"] == 6)
            assert server.servicer.streams.open_count() == 1
        finally:
            for page in (*pages, *lists):
                page.close()
            view.close()


def _status(url: str, path: str) -> tuple[int, str]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    result = resp.status, resp.read().decode("utf-8", "replace")
    conn.close()
    return result


def test_session_ids_no_authority_would_hold_are_refused_with_a_bounded_reason():
    with running_authority() as (server, _):
        view = ViewThread(ViewConfig(f"127.0.0.1:{server.port}", ANY))
        try:
            odd = ["x" * 2000, "..%2Fetc", "%00", "a%0Ab", "%C3%A9t%C3%A9", "%FF", "a+b", "-a"]
            for raw in odd:
                status, body = _status(view.url, f"/events?session={raw}")
                assert status == 400, raw
                assert "session id" in body and len(body) < 300
            # A request line over 8 KB never reaches the view: aiohttp refuses it.
            assert _status(view.url, "/events?session=" + "x" * 20_000)[0] == 400
            # A well-formed id the authority does not hold is a page that says so.
            page = EventStream(view.url, "nobody.here_1")
            try:
                assert page.wait_for("session")["state"] == "missing"
            finally:
                page.close()
        finally:
            view.close()


def test_a_page_that_never_reads_is_dropped_and_frees_its_slot():
    with running_authority() as (server, channel):
        client = stub(channel)
        rows = 3000  # a frame of several hundred KB: it cannot sit in socket buffers alone
        client.CreateSession(create_request("big", hard_max=rows + 64))
        client.Patch(patch_stream("big", 0, "prime", [append_pb(0, ids(rows), 1)]))
        config = ViewConfig(
            f"127.0.0.1:{server.port}", ANY, refresh_hz=50, max_viewers=2, stall_s=1.0
        )
        view = ViewThread(config)
        parts = urllib.parse.urlsplit(view.url)
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect((parts.hostname, parts.port))
        stuck.sendall(b"GET /events?session=big HTTP/1.1\r\nHost: view\r\n\r\n")  # never read
        reader = EventStream(view.url, "big")
        try:
            reader.wait_for("session", lambda d: d["version"] == 1)
            assert EventStream(view.url).response.status == 503  # both slots taken
            for v in range(1, 30):
                append_one(client, "big", v, rows=rows + v - 1)
                # The page that reads is never held back by the one that does not.
                reader.wait_for("session", lambda d, v=v: d["version"] >= v + 1, timeout=30)
                probe = EventStream(view.url)
                if probe.response.status == 200:
                    probe.close()
                    break
            else:
                pytest.fail("the page that never reads still holds its slot")
        finally:
            stuck.close()
            reader.close()
            view.close()


def test_a_huge_session_is_sent_as_its_newest_rows():
    with running_authority() as (server, channel):
        client = stub(channel)
        rows = MAX_SHOWN_ROWS + 10
        client.CreateSession(create_request("huge", hard_max=rows))
        client.Patch(patch_stream("huge", 0, "prime", [append_pb(0, ids(rows), 1)]))
        merge = replace_pb(rows - 2, ids(rows)[-2:], 9, seed=2)
        client.Patch(patch_stream("huge", 1, "m", [merge]))
        view = ViewThread(ViewConfig(f"127.0.0.1:{server.port}", ANY))
        page = EventStream(view.url, "huge")
        try:
            shown = page.wait_for("session", lambda d: d["version"] == 2)
            assert shown["rows"] == rows - 1
            assert len(shown["tokens"]) == MAX_SHOWN_ROWS
            assert shown["hidden_rows"] == rows - 1 - MAX_SHOWN_ROWS
            held = client.GetSession(ca.GetSessionRequest(session_id="huge")).mirror
            newest = [m.ledger_id for m in held[-MAX_SHOWN_ROWS:]]
            assert [t["ledger"] for t in shown["tokens"]] == newest
            assert shown["tokens"][-1]["replaced_ids"] == ids(rows)[-2:]
        finally:
            page.close()
            view.close()


def test_an_authority_back_without_its_data_shows_the_session_missing_then_anew(tmp_path):
    port = free_port()
    first = AuthorityConfig(listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "a"), grace_s=0.2)
    server = start_authority(first)
    view = ViewThread(ViewConfig(f"127.0.0.1:{port}", ANY, refresh_hz=20))
    page = EventStream(view.url, "s")
    try:
        client = stub(rpc.open_channel(f"127.0.0.1:{port}"))
        client.CreateSession(create_request("s", hard_max=16))
        client.Patch(patch_stream("s", 0, "p", [append_pb(0, [1, 2, 3], 1)]))
        for v in range(1, 4):
            append_one(client, "s", v, rows=v + 2)
        page.wait_for("session", lambda d: d["version"] == 4)

        server.stop(0.2)
        page.wait_for("status", lambda d: d["state"] == "down")
        server = start_authority(
            AuthorityConfig(listen=first.listen, data_dir=str(tmp_path / "b"), grace_s=0.2)
        )
        page.wait_for("status", lambda d: d["state"] == "live")
        gone = page.wait_for("session", lambda d: d["state"] == "missing")
        assert gone["version"] == 4 and gone["tokens"]  # the last rows seen stay

        client = stub(rpc.open_channel(f"127.0.0.1:{port}"))
        client.CreateSession(create_request("s", hard_max=16), wait_for_ready=True, timeout=30)
        client.Patch(patch_stream("s", 0, "p", [append_pb(0, [7], 1)]))
        anew = page.wait_for("session", lambda d: d["state"] == "live" and d["version"] == 1)
        assert [t["token"] for t in anew["tokens"]] == [7]
    finally:
        page.close()
        view.close()
        server.stop(0.2)


def test_a_bug_in_handling_the_watch_is_reported_and_the_watch_opened_again():
    async def scenario(port: int) -> list[str]:
        link = AuthorityLink(f"127.0.0.1:{port}", None, None)
        seen: list[str] = []
        again = asyncio.Event()

        def connected(infos) -> None:
            seen.append("connected")
            if len(seen) == 1:
                raise RuntimeError("a bug")
            again.set()

        events = LinkEvents(connected=connected, commit=lambda c: None, down=seen.append)
        task = asyncio.create_task(link.follow(events))
        try:
            await asyncio.wait_for(again.wait(), 30)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await link.close()
        return seen

    with running_authority() as (server, _):
        seen = asyncio.run(scenario(server.port))
    assert seen == ["connected", "the view failed (RuntimeError); watching again", "connected"]


def test_pages_that_leave_before_their_stream_starts_are_no_error(caplog):
    with running_authority() as (server, _):
        view = ViewThread(ViewConfig(f"127.0.0.1:{server.port}", ANY))
        parts = urllib.parse.urlsplit(view.url)
        try:
            for _ in range(20):  # a browser navigating away at once, as a click on the list does
                with socket.create_connection((parts.hostname, parts.port)) as gone:
                    gone.sendall(b"GET /events HTTP/1.1\r\nHost: view\r\n\r\n")
                    gone.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
            page = EventStream(view.url)  # still serving
            page.wait_for("sessions")
            page.close()
        finally:
            view.close()
    # The view's own loggers and aiohttp's (grpc.aio's "Event loop is closed" from other tests'
    # loops, shut down while this one runs, is not the view's).
    assert not [
        r
        for r in caplog.records
        if r.levelname == "ERROR" and r.name.startswith(("positronic.view", "aiohttp"))
    ]
