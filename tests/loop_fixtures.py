"""Helpers for loop tests: services as in-process servers or as real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    for k in [k for k in e if k.startswith("POSITRONIC_")]:
        del e[k]
    return e


class Service:
    """A `positronic` subcommand in its own process; its first stdout line is its address."""

    def __init__(self, args: list[str], timeout_s: float = 60.0, extra_env=None):
        environ = env()
        environ.update(extra_env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "positronic.cli", *args],
            cwd=REPO,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + timeout_s
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line or time.monotonic() > deadline:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.proc.kill()
            raise RuntimeError(f"{args[0]} did not print its address: {err[-2000:]}")
        self.address = line.strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def authority_process(data_dir: Path | None = None, port: int = 0) -> Service:
    args = ["authority", "--listen", f"127.0.0.1:{port}"]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    return Service(args)


def worker_process(model: Path, authority: str, port: int = 0) -> Service:
    return Service(
        [
            "worker",
            "--model",
            str(model),
            "--listen",
            f"127.0.0.1:{port}",
            "--authority",
            authority,
            "--device",
            "cpu",
        ],
        timeout_s=120.0,
    )
