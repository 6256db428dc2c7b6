"""Processes of the speed benchmark: the services as `positronic` subprocesses, their peak
memory, and the worker's Sync byte counter from its /metrics endpoint."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path


def peak_rss_bytes(pid: int | str = "self") -> int:
    """VmHWM (peak resident set) of a process, from /proc."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def service(args: list[str], log: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """`positronic ARGS` in its own process; yields it and the address it prints first."""
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "positronic.cli", "--log-level", "WARNING", *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        try:
            address = proc.stdout.readline().strip() if proc.stdout else ""
            if not address:
                raise RuntimeError(f"{args[0]} did not start: {log.read_text()[-2000:]}")
            yield proc, address
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(metrics_port: int) -> str:
    """A local /metrics page."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def follow_costs(families: Iterable) -> dict:
    """The replica-follow hop from a worker's metric families (a registry's collect(), or a
    scraped page parsed): deltas followed, and the mean ms per delta of the apply and of commit
    -> applied (the lag a Tick right after its Patch may wait for)."""
    sums: dict[str, dict[str, float]] = {}
    for family in families:
        for key in ("apply", "lag"):
            if family.name == f"positronic_worker_follow_{key}_seconds":
                for sample in family.samples:
                    if sample.name.endswith(("_sum", "_count")):
                        sums.setdefault(key, {})[sample.name.rsplit("_", 1)[1]] = sample.value
    out: dict = {"deltas": int(sums.get("apply", {}).get("count", 0))}
    for key, s in sums.items():
        if s.get("count"):
            out[f"{key}_mean_ms"] = 1e3 * s["sum"] / s["count"]
    return out


def scraped_follow_costs(metrics_port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return follow_costs(text_string_to_metric_families(scrape(metrics_port)))


def sync_bytes(metrics_port: int) -> int:
    """The worker's positronic_worker_sync_bytes counters, summed over kinds."""
    text = scrape(metrics_port)
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("positronic_worker_sync_bytes_total")
        )
    )


def worker_sync_bytes(metrics) -> int:
    """The same counter read from an in-process worker's WorkerMetrics."""
    total = 0.0
    for family in metrics.registry.collect():
        if family.name == "positronic_worker_sync_bytes":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return int(total)
