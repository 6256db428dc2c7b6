"""The live view in a real browser (Debian's chromium, driven by Playwright) against real
processes: an authority, a worker, `positronic view` and `positronic generate`.

While generate runs, two browser contexts (independent pages, each with its own event stream)
show the session: rows appear, the version grows, a merge is marked. Both settle on what the
authority holds. A stopped authority, its return, a deleted session and a stopped view server
each show as such.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from positronic import rpc
from positronic.models import demo_model_dir
from positronic.v1 import cache_authority_pb2 as ca
from positronic.v1 import cache_authority_pb2_grpc
from positronic.view.render import SOURCES, piece_texts
from tests.conftest import REPO
from tests.loop_fixtures import Service, authority_process, env, free_port, worker_process

CHROMIUM = "/usr/bin/chromium"
# Flags that work on these machines (no GPU, no network, no sandbox for root).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 45_000


def playwright_or_skip():
    """Playwright's sync API, when it and Debian's chromium are here; else the test is skipped
    (and fails in CI, whose .ci/run installs both)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not shutil.which(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"CI must have {CHROMIUM} and playwright (.ci/run installs both)")
        pytest.skip(f"needs {CHROMIUM} (apt-get install chromium) and playwright")
    return sync_playwright


@pytest.fixture
def stack(tmp_path) -> Iterator[Future[list[Service]]]:
    """An authority, a worker and `positronic view`, started in the background (each imports
    torch or aiohttp for seconds) while the browser launches; stopped at the end."""
    playwright_or_skip()

    def start() -> list[Service]:
        services.append(authority_process(tmp_path / "data", free_port()))
        address = services[0].address
        services.append(worker_process(demo_model_dir(), address))
        view = ["view", "--authority", address, "--listen", "127.0.0.1:0", "--max-viewers", "2"]
        services.append(Service(view))
        return services

    services: list[Service] = []
    with ThreadPoolExecutor(1) as pool:
        started = pool.submit(start)
        try:
            yield started
        finally:
            started.exception()  # wait for it to finish before stopping what it started
            for service in reversed(services):
                service.kill()  # no grace: nothing is checked after this


@pytest.fixture
def browser() -> Iterator:
    """Debian's chromium, headless."""
    with playwright_or_skip()() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def version_of(page) -> int:
    text = page.text_content("#version") or ""
    return int(text) if text.isdigit() else 0


def wait_banner(page, kind: str) -> None:
    page.wait_for_selector(f"#banner[data-kind='{kind}']:not([hidden])", timeout=WAIT_MS)


def test_two_browsers_follow_generate_and_show_a_dropped_authority_and_a_deletion(
    stack, browser, tmp_path
):
    generate: subprocess.Popen | None = None
    services = stack.result(timeout=180)
    authority, worker, view = services
    address, url = authority.address, view.address
    port = int(address.rpartition(":")[2])
    try:
        # Started first: it imports torch for seconds while the pages load.
        generate = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "positronic.cli",
                "generate",
                "--prompt",
                "Once upon a time",
                "--authority",
                address,
                "--worker",
                worker.address,
                "--max-new-tokens",
                "5000",  # stopped by the test, so that it surely runs while the pages look
                "--target-size",
                "16",
                "--seed",
                "1",
                "--no-echo-prompt",
            ],
            cwd=REPO,
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        pages = [browser.new_context().new_page() for _ in range(2)]
        # A URL that names no valid session id says so (the server would refuse its stream).
        pages[1].goto(f"{url}?session=..%2Fx")
        wait_banner(pages[1], "refused")
        assert "is not a session id" in (pages[1].text_content("#banner") or "")
        pages[0].goto(url)
        pages[0].wait_for_selector("#list:not([hidden])", timeout=WAIT_MS)

        # The list shows the new session; one page picks it there, the other opens its URL.
        # A locator, not an element handle: the list is redrawn twice a second.
        link = pages[0].locator("#sessions tbody tr a").first
        session_id = link.text_content(timeout=WAIT_MS)
        link.click(timeout=WAIT_MS)
        pages[0].wait_for_url(f"**/?session={session_id}", timeout=WAIT_MS)
        pages[1].goto(f"{url}?session={session_id}")

        for page in pages:
            page.wait_for_selector("#text .tok", timeout=WAIT_MS)  # rows appear
            seen = version_of(page)
            page.wait_for_function(
                f"() => Number(document.getElementById('version').textContent) >= {seen + 10}",
                timeout=WAIT_MS,
            )  # the version grows
            merged = page.wait_for_selector("#text .tok.merged", timeout=WAIT_MS)
            assert "merged at version" in (merged.get_attribute("title") or "")
            page.wait_for_selector("#marks li.merge", timeout=WAIT_MS)
            assert page.text_content("#target") == "16"
            assert generate.poll() is None, "generate ended before the page was checked"
        generate.terminate()
        generate.wait(30)

        # Both pages settle on what the authority holds.
        channel = rpc.open_channel(address)
        client = cache_authority_pb2_grpc.CacheAuthorityStub(channel)
        held = client.GetSession(ca.GetSessionRequest(session_id=session_id))
        structural = [SOURCES.get(m.source) == "structural" for m in held.mirror]
        expected = [t or "\u200b" for t in piece_texts([m.piece for m in held.mirror], structural)]
        for page in pages:
            page.wait_for_function(
                "v => document.getElementById('text').dataset.version === String(v)",
                arg=held.session.version,
                timeout=WAIT_MS,
            )
            shown = page.eval_on_selector_all("#text .tok", "all => all.map(s => s.textContent)")
            assert shown == expected
            assert page.text_content("#rows") == str(held.session.row_count)
            assert page.is_hidden("#banner")

        # A third page is one over --max-viewers: it says that the server refused it, and why.
        third = browser.new_context().new_page()
        third.goto(url)
        wait_banner(third, "turned-away")
        assert "503: this view serves at most 2 pages" in (third.text_content("#banner") or "")
        third.context.close()

        # The authority goes away (killed, as a crash would): a banner, not a frozen page. It
        # comes back (same port, same data): the banner goes and the session is shown again.
        authority.kill()
        for page in pages:
            wait_banner(page, "authority")
        services[0] = authority = authority_process(tmp_path / "data", port)
        for page in pages:
            page.wait_for_selector("#banner[hidden]", state="attached", timeout=WAIT_MS)
            assert version_of(page) == held.session.version

        channel.close()
        channel = rpc.open_channel(address)
        client = cache_authority_pb2_grpc.CacheAuthorityStub(channel)
        # wait_for_ready: a subchannel to this port may still be backing off from the stop.
        client.DeleteSession(
            ca.DeleteSessionRequest(session_id=session_id), wait_for_ready=True, timeout=30
        )
        for page in pages:
            wait_banner(page, "deleted")
        channel.close()

        view.stop()  # the view server itself goes away
        for page in pages:
            wait_banner(page, "server")
    finally:
        if generate is not None and generate.poll() is None:
            generate.kill()
            generate.wait(10)
