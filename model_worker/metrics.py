"""Prometheus metrics of one worker, in a private registry (no process-global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_FOLLOW_BUCKETS = (1e-4, 2.5e-4, 5e-4, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step_seconds = Histogram(
            "positronic_worker_step_seconds",
            "Forward time of Step calls",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "positronic_worker_rpc_seconds",
            "Wall time of each RPC, sync included",
            ["rpc"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("positronic_worker_tokens", "Tokens forwarded", ["rpc"], registry=r)
        self.tokens_per_second = Gauge(
            "positronic_worker_tokens_per_second",
            "Throughput of the latest call of each kind (tokens over forward time)",
            ["rpc"],
            registry=r,
        )
        self.sync_bytes = Counter(
            "positronic_worker_sync_bytes",
            "Bytes received from the authority's Sync",
            ["kind"],
            registry=r,
        )
        # The replica-follow hop, per committed delta: the apply itself (digest, decode, stage,
        # commit) and the lag from the authority's commit to the applied replica (the stream and
        # the apply: what a Tick right after its Patch may wait for).
        self.follow_apply_seconds = Histogram(
            "positronic_worker_follow_apply_seconds",
            "Time to apply one followed committed delta to its replica",
            buckets=_FOLLOW_BUCKETS,
            registry=r,
        )
        self.follow_lag_seconds = Histogram(
            "positronic_worker_follow_lag_seconds",
            "From the authority's commit (its committed_unix_ns) to the delta applied here",
            buckets=_FOLLOW_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "positronic_worker_errors", "Refused or failed RPCs", ["rpc", "code"], registry=r
        )

    def forwarded(self, rpc: str, tokens: int, seconds: float) -> None:
        self.tokens.labels(rpc).inc(tokens)
        if seconds > 0:
            self.tokens_per_second.labels(rpc).set(tokens / seconds)

    def followed(self, apply_s: float, lag_s: float) -> None:
        self.follow_apply_seconds.observe(apply_s)
        self.follow_lag_seconds.observe(max(lag_s, 0.0))  # clocks of two hosts may disagree

    def add_sync_bytes(self, kind: str, n: int) -> None:
        self.sync_bytes.labels(kind).inc(n)

    def serve(self, port: int, addr: str = "0.0.0.0") -> tuple[int, Callable[[], None]]:
        """Serve /metrics on `port` (0: any); returns the bound port and a function that stops
        the endpoint."""
        server, thread = start_http_server(port, addr=addr, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return int(server.server_port), stop
