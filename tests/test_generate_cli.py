"""`positronic generate` as a new user runs it: no --model (the packaged demo model), the prompt
printed before its continuation, and a progress line on a terminal that ends with the stats."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pyte
import pytest

from tests.loop_fixtures import env

PROMPT = "Once upon a time"
ARGS = ["--max-new-tokens", "40", "--seed", "2"]
STATUS = re.compile(
    r"^\d+/40 tokens, [\d.]+ tokens/s, max rows \d+/\d+, \d+ merges, \d+ evictions$"
)


def generate(*args: str, cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "positronic.cli", "generate", *args]
    r = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def echoed(tmp_path_factory) -> subprocess.CompletedProcess:
    """The demo command as a new user types it (plus a length and a seed), from a folder with
    nothing beside it."""
    return generate("--prompt", PROMPT, *ARGS, cwd=tmp_path_factory.mktemp("demo"))


def test_demo_runs_with_no_model_and_prints_the_prompt_first(echoed, tmp_path):
    assert echoed.stdout.startswith(PROMPT) and echoed.stdout.endswith("\n")
    assert len(echoed.stdout.split()) > 20
    assert "stories260K" in echoed.stderr  # the packaged model, named in the log
    assert "\x1b" not in echoed.stderr and not any(
        STATUS.match(line) for line in echoed.stderr.splitlines()
    )  # stderr is no terminal: no progress line unless asked

    bare = generate("--prompt", PROMPT, *ARGS, "--no-echo-prompt", "--progress", cwd=tmp_path)
    assert PROMPT + bare.stdout == echoed.stdout  # the same continuation, byte for byte
    lines = bare.stderr.splitlines()
    assert any(STATUS.match(line) for line in lines)  # asked for: plain lines, for logs
    assert "\x1b" not in bare.stderr and "\r" not in bare.stderr
    assert "40 tokens in" in lines[-1]  # the stats line comes last


def test_the_continuation_keeps_its_leading_space(tmp_path):
    # Greedy, the model continues "Once upon a time," with "▁there": decoded alone that token
    # loses its space; decoded after the prompt's last tokens it keeps it.
    r = generate("--prompt", "Once upon a time,", "--max-new-tokens", "3", "--temperature", "0",
                 cwd=tmp_path)  # fmt: skip
    assert r.stdout.startswith("Once upon a time, there")


def test_progress_line_on_a_terminal_ends_with_the_stats_line(echoed, tmp_path):
    columns, rows = 70, 200
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    environ = env()
    environ["TERM"] = "xterm"
    proc = subprocess.Popen(
        [sys.executable, "-m", "positronic.cli", "generate", "--prompt", PROMPT, *ARGS],
        cwd=tmp_path,
        env=environ,
        stdin=subprocess.DEVNULL,
        stdout=slave,  # text and progress on one terminal, as a user at a shell sees them
        stderr=slave,
    )
    os.close(slave)
    data = b""
    try:
        while chunk := _read(master):
            data += chunk
    finally:
        os.close(master)
        assert proc.wait(timeout=300) == 0, data[-3000:]
    assert b"\x1bD" in data  # the line was drawn
    screen = pyte.Screen(columns, rows)
    pyte.ByteStream(screen).feed(data)
    shown = [r.rstrip() for r in screen.display]
    start = next(i for i, r in enumerate(shown) if r.startswith(PROMPT))
    end = next(
        i for i in range(start, rows) if "INFO positronic.generate_cmd: 40 tokens" in shown[i]
    )
    story = echoed.stdout.rstrip("\n")
    expected = [story[i : i + columns].rstrip() for i in range(0, len(story), columns)]
    assert shown[start:end] == expected  # the text exactly, nothing of the line left in it
    assert not any(STATUS.match(r) for r in shown)  # the line is gone: the stats line replaced it
    assert all(r == "" for r in shown[end + 2 :])


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the child closed the terminal
        return b""
