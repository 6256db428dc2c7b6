"""`positronic view` against a real authority (in this process, on loopback): what its event
streams say as patches commit, a session is deleted, the authority drops and comes back; one
Watch however many pages; the token and TLS; refusals."""

from __future__ import annotations

import http.client
import urllib.parse

import pytest

from cache_authority.server import AuthorityConfig, start_authority
from positronic import cli, rpc
from positronic.tls import ClientTls, ServerTls
from positronic.v1 import cache_authority_pb2 as ca
from positronic.view.main import ViewConfig
from tests.authority_fixtures import (
    append_pb,
    create_request,
    evict_pb,
    patch_stream,
    replace_pb,
    running_authority,
    stub,
)
from tests.loop_fixtures import free_port
from tests.tls_fixtures import make_certs
from tests.view_fixtures import EventStream, ViewThread

ANY = "127.0.0.1:0"  # the view's listen address in tests


def test_a_session_stream_follows_merges_evictions_and_the_deletion():
    with running_authority() as (server, channel):
        client = stub(channel)
        client.CreateSession(create_request("s", hard_max=16, target=8))
        client.Patch(patch_stream("s", 0, "prime", [append_pb(0, [10, 11, 12, 13, 14], 1)]))
        view = ViewThread(
            ViewConfig(authority=f"127.0.0.1:{server.port}", listen=ANY, refresh_hz=20)
        )
        pages = [EventStream(view.url, "s"), EventStream(view.url, "s")]
        listing = EventStream(view.url)
        try:
            for page in pages:
                first = page.wait_for("session", lambda d: d["version"] == 1)
                texts = [t["text"] for t in first["tokens"]]
                assert texts == ["<10>", "<11>", "<12>", "<13>", "<14>"]
                assert (first["rows"], first["target"], first["hard_max"]) == (5, 8, 16)
                assert first["state"] == "live"
            # Three pages, one Watch: the view is the only stream client of the authority.
            assert server.servicer.streams.open_count() == 1

            client.Patch(patch_stream("s", 1, "m", [replace_pb(1, [11, 12], 40, seed=2)]))
            merged = pages[0].wait_for("session", lambda d: d["version"] == 2)
            row = next(t for t in merged["tokens"] if t["source"] == "merged")
            assert row["replaced_ids"] == [11, 12] and row["replaced_pieces"] == ["<11>", "<12>"]
            assert merged["fresh"] == [row["ledger"]]
            assert [m["kind"] for m in merged["marks"]] == ["merge"]

            client.Patch(patch_stream("s", 2, "e", [evict_pb(2, 13)]))
            evicted = pages[1].wait_for("session", lambda d: d["version"] == 3)
            assert [t["text"] for t in evicted["tokens"]] == ["<10>", "<40>", "<14>"]
            last = evicted["tokens"][-1]["ledger"]
            assert evicted["ghosts"] == [{"text": "<13>", "before": last}]
            assert [m["kind"] for m in evicted["marks"]] == ["merge", "evict"]
            assert (evicted["merges_seen"], evicted["evictions_seen"]) == (1, 1)
            listed = listing.wait_for("sessions", lambda d: d["sessions"][0]["version"] == 3)
            assert listed["sessions"][0]["session"] == "s"

            client.DeleteSession(ca.DeleteSessionRequest(session_id="s"))
            for page in pages:
                gone = page.wait_for("session", lambda d: d["state"] == "deleted")
                assert gone["version"] == 3 and gone["tokens"]  # the last rows stay shown
            listing.wait_for("sessions", lambda d: d["sessions"][0]["state"] == "deleted")
        finally:
            for stream in (*pages, listing):
                stream.close()
            view.close()


def test_an_authority_that_drops_shows_as_down_and_the_view_reconnects(tmp_path):
    port = free_port()
    config = AuthorityConfig(listen=f"127.0.0.1:{port}", data_dir=str(tmp_path), grace_s=0.2)
    server = start_authority(config)
    view = ViewThread(ViewConfig(authority=f"127.0.0.1:{port}", listen=ANY, refresh_hz=20))
    page = EventStream(view.url, "a")
    listing = EventStream(view.url)
    try:
        page.wait_for("status", lambda d: d["state"] == "live")
        page.wait_for("session", lambda d: d["state"] == "missing")  # not created yet
        client = stub(server_channel(port))
        client.CreateSession(create_request("a", hard_max=8))
        client.Patch(patch_stream("a", 0, "prime", [append_pb(0, [1, 2, 3], 1)]))
        page.wait_for("session", lambda d: d["state"] == "live" and d["version"] == 1)
        listing.wait_for("sessions", lambda d: [s["session"] for s in d["sessions"]] == ["a"])

        server.stop(0.2)
        for stream in (page, listing):
            down = stream.wait_for("status", lambda d: d["state"] == "down")
            assert down["authority"] == f"127.0.0.1:{port}" and down["detail"]

        server = start_authority(config)  # same port, same data: the session comes back
        page.wait_for("status", lambda d: d["state"] == "live")
        client = stub(server_channel(port))
        # wait_for_ready: gRPC shares subchannels across channels of a process, and the one to
        # this port may still be backing off from the stopped server.
        client.Patch(
            patch_stream("a", 1, "more", [append_pb(3, [4], 2)]), wait_for_ready=True, timeout=30
        )
        back = page.wait_for("session", lambda d: d["version"] == 2)
        assert [t["token"] for t in back["tokens"]] == [1, 2, 3, 4]
    finally:
        page.close()
        listing.close()
        view.close()
        server.stop(0.2)


def server_channel(port: int):
    return rpc.open_channel(f"127.0.0.1:{port}")


def test_the_view_calls_with_the_bearer_token_over_tls(tmp_path):
    certs = make_certs(tmp_path)
    tls = ServerTls(certs.server.cert, certs.server.key)
    with running_authority(tls=tls, auth_token="sesame") as (server, _):
        address = f"localhost:{server.port}"
        good = ViewThread(ViewConfig(address, ANY, auth_token="sesame", tls=ClientTls(ca=certs.ca)))
        wrong = ViewThread(ViewConfig(address, ANY, auth_token="wrong", tls=ClientTls(ca=certs.ca)))
        pages = [EventStream(good.url), EventStream(wrong.url)]
        try:
            pages[0].wait_for("status", lambda d: d["state"] == "live")
            pages[0].wait_for("sessions", lambda d: d["sessions"] == [])
            refused = pages[1].wait_for("status", lambda d: d["state"] == "down")
            assert refused["detail"].startswith("UNAUTHENTICATED")
        finally:
            for page in pages:
                page.close()
            good.close()
            wrong.close()


def test_with_session_the_front_stream_shows_that_session():
    with running_authority() as (server, channel):
        client = stub(channel)
        client.CreateSession(create_request("only", hard_max=8))
        client.Patch(patch_stream("only", 0, "prime", [append_pb(0, [1, 2], 1)]))
        view = ViewThread(ViewConfig(f"127.0.0.1:{server.port}", ANY, session="only"))
        front = EventStream(view.url)
        try:
            assert front.wait_for("hello")["session"] == "only"
            assert front.wait_for("session", lambda d: d["version"] == 1)["rows"] == 2
            assert "sessions" not in front.latest
        finally:
            front.close()
            view.close()


def _get(url: str, path: str) -> int:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", path)
    status = conn.getresponse().status
    conn.close()
    return status


def test_the_page_is_served_and_bad_or_too_many_streams_are_refused():
    with running_authority() as (server, _):
        view = ViewThread(ViewConfig(f"127.0.0.1:{server.port}", ANY, max_viewers=1))
        try:
            assert _get(view.url, "/") == 200
            for name in ("view.js", "view.css"):
                assert _get(view.url, f"/static/{name}") == 200
            assert _get(view.url, "/static/../main.py") == 404
            assert _get(view.url, "/events?session=" + "x" * 200) == 400
            assert _get(view.url, "/events?session=..%2Fetc") == 400
            first = EventStream(view.url)
            first.wait_for("status")
            assert EventStream(view.url).response.status == 503  # over --max-viewers
            first.close()
        finally:
            view.close()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["view"], "needs --authority"),
        (["view", "--authority", "a:1", "--session", "../x"], "session id"),
        (["view", "--authority", "a:1", "--listen", "nowhere"], "--listen must be HOST:PORT"),
        (["view", "--authority", "a:1", "--refresh-hz", "0"], "--refresh-hz"),
    ],
)
def test_the_command_refuses_bad_flags(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("POSITRONIC_AUTHORITY", raising=False)
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_command_says_when_its_port_is_taken(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["view", "--authority", "127.0.0.1:1", "--listen", f"127.0.0.1:{port}"]
        assert cli.main(argv) == 1
    assert "view:" in capsys.readouterr().err
