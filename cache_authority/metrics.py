"""Prometheus metrics of one authority: patch latency, rows and versions per session, bytes moved.

Each instance has its own CollectorRegistry, so several authorities (tests) can share a process.
"""

from __future__ import annotations

import contextlib
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

from cache_authority.rows import SessionState

# Patch latency spans a one-row tick (~100 us) to a large prime (seconds).
_LATENCY_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.patch_seconds = Histogram(
            "positronic_authority_patch_seconds",
            "Time to validate, log and apply a patch, by outcome (OK or the status code)",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rows = Gauge(
            "positronic_authority_session_rows", "Rows a session holds", ["session_id"], registry=r
        )
        self.version = Gauge(
            "positronic_authority_session_version",
            "Committed version of a session",
            ["session_id"],
            registry=r,
        )
        self.bytes_in = Counter(
            "positronic_authority_bytes_in", "Patch request bytes received", registry=r
        )
        self.bytes_out = Counter(
            "positronic_authority_bytes_out", "Sync and GetSession bytes sent", registry=r
        )
        self._http: WSGIServer | None = None

    def observe_patch(self, elapsed_ns: int, outcome: str) -> None:
        self.patch_seconds.labels(outcome).observe(elapsed_ns / 1e9)

    def set_session(self, state: SessionState) -> None:
        self.rows.labels(state.session_id).set(state.row_count)
        self.version.labels(state.session_id).set(state.version)

    def remove_session(self, session_id: str) -> None:
        for gauge in (self.rows, self.version):
            with contextlib.suppress(KeyError):
                gauge.remove(session_id)

    def add_bytes_in(self, n: int) -> None:
        self.bytes_in.inc(n)

    def add_bytes_out(self, n: int) -> None:
        self.bytes_out.inc(n)

    def render(self) -> bytes:
        """The text exposition format, as /metrics serves it."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics over HTTP on `port` (0: any free port); returns the bound port."""
        http, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = http
        return int(http.server_address[1])

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
