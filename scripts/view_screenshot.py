"""Make docs/view.png: the live view of a real halo run, photographed by headless chromium.

Starts an authority, a worker (the packaged demo model), `positronic view` and
`positronic generate` (policy halo by default) as processes on loopback ports, waits until the
session has merged for a while, screenshots the session page while generate still runs, and
stops everything. Needs Debian's chromium (/usr/bin/chromium) and the playwright package (dev
extra).

    .venv/bin/python scripts/view_screenshot.py [--out docs/view.png]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]


def start(*args: str) -> tuple[subprocess.Popen, str]:
    """A `positronic` subcommand; its first stdout line (its address)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "positronic.cli", "--log-level", "WARNING", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        raise SystemExit(f"{args[0]} printed no address")
    return proc, line


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "docs" / "view.png"))
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--policy", default="halo")
    p.add_argument("--target-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--shot-at-version", type=int, default=240, help="photograph from here on")
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--height", type=int, default=540)
    args = p.parse_args()

    procs: list[subprocess.Popen] = []
    try:
        authority, address = start("authority", "--listen", "127.0.0.1:0")
        procs.append(authority)
        worker, worker_address = start("worker", "--listen", "127.0.0.1:0", "--authority", address)
        procs.append(worker)
        view, url = start("view", "--authority", address, "--listen", "127.0.0.1:0")
        procs.append(view)
        generate = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "positronic.cli",
                "generate",
                "--prompt",
                args.prompt,
                "--authority",
                address,
                "--worker",
                worker_address,
                "--policy",
                args.policy,
                "--target-size",
                str(args.target_size),
                "--seed",
                str(args.seed),
                "--max-new-tokens",
                "100000",  # stopped once photographed
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(generate)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(url)
            # A locator, not an element: the list is redrawn twice a second.
            page.locator("#sessions tbody tr a").first.click(timeout=120_000)
            page.wait_for_function(
                "v => Number(document.getElementById('version').textContent) >= v",
                arg=args.shot_at_version,
                timeout=300_000,
            )
            time.sleep(0.5)  # let the refresh that crossed the line paint
            page.screenshot(path=args.out)
            browser.close()
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(30)
    # A palette PNG: the page has few colours, and the README should stay light.
    Image.open(args.out).convert("RGB").quantize(colors=64).save(args.out, optimize=True)
    print(f"{args.out}: {Path(args.out).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
