"""Configuration and start-up of one cache authority process (or of one in a test)."""

from __future__ import annotations

from dataclasses import dataclass

from cache_authority.admission import StreamLimits
from cache_authority.durability import Durability
from cache_authority.engine import Engine
from cache_authority.metrics import Metrics
from cache_authority.persistence import SessionStore
from cache_authority.servicer import SERVICE_NAME, CacheAuthorityServicer
from cache_authority.sessions import EngineLimits
from positronic.aio_server import AioRunningServer, start_aio_server
from positronic.tls import ServerTls
from positronic.v1 import cache_authority_pb2_grpc


@dataclass(frozen=True)
class AuthorityConfig:
    listen: str = "127.0.0.1:50051"  # HOST:PORT; port 0 picks a free one
    data_dir: str | None = None  # None keeps every session in memory only
    auth_token: str | None = None  # None: no bearer-token check
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: any free port
    snapshot_every: int = 1000  # versions between snapshots; the WAL covers the rest
    # When a patch's log record is fsynced: before the reply, by a flusher, never (durability.py).
    durability: str = "fsync"
    fsync_interval_ms: int = 100  # the batch setting's flusher period
    log_retention: int = 1024  # patches kept in memory so replicas can catch up with deltas
    log_retention_bytes: int = 256 << 20
    max_session_bytes: int = 8 << 30  # preallocation limit of one session (hard_max_rows)
    max_total_bytes: int = 32 << 30  # ... and of all sessions together
    # Threads for blocking engine work (patch apply + fsync, snapshots, reads under a session
    # lock). Streams hold none: the server is grpc.aio, a waiting stream is a coroutine.
    engine_threads: int = 16
    max_streams_per_client: int = 1024  # open Patch/Sync/Watch streams per client address
    max_streams_per_session: int = 64  # ... naming one session
    max_streams: int = 16384  # ... in all
    max_all_session_watches: int = 64  # Watches of every session (each costs work per commit)
    grace_s: float = 2.0  # how long in-flight calls may finish on shutdown
    tls: ServerTls | None = None  # None: plaintext

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"listen must be HOST:PORT, not {self.listen!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port {self.metrics_port} out of range")
        for name in (
            "snapshot_every",
            "log_retention",
            "log_retention_bytes",
            "max_session_bytes",
            "max_total_bytes",
            "engine_threads",
            "max_streams_per_client",
            "max_streams_per_session",
            "max_streams",
            "max_all_session_watches",
            "fsync_interval_ms",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.grace_s < 0:
            raise ValueError("grace_s must not be negative")
        Durability.parse(self.durability)

    def limits(self) -> EngineLimits:
        return EngineLimits(
            max_session_bytes=self.max_session_bytes,
            max_total_bytes=self.max_total_bytes,
            log_retention=self.log_retention,
            log_retention_bytes=self.log_retention_bytes,
            snapshot_every=self.snapshot_every,
        )

    def stream_limits(self) -> StreamLimits:
        return StreamLimits(
            per_peer=self.max_streams_per_client,
            per_session=self.max_streams_per_session,
            total=self.max_streams,
            every_session=self.max_all_session_watches,
        )


@dataclass
class AuthorityServer(AioRunningServer):
    """A running authority: the gRPC server plus its engine and metrics endpoint."""

    engine: Engine | None = None
    metrics_port: int | None = None
    servicer: CacheAuthorityServicer | None = None


def start_authority(config: AuthorityConfig) -> AuthorityServer:
    """Recover persisted sessions (if any), then serve CacheAuthority, health and reflection."""
    store = (
        SessionStore(config.data_dir, config.durability, config.fsync_interval_ms)
        if config.data_dir
        else None
    )
    metrics = Metrics()
    engine = Engine(config.limits(), store, metrics)
    servicer = CacheAuthorityServicer(
        engine, engine_threads=config.engine_threads, stream_limits=config.stream_limits()
    )
    try:
        running = start_aio_server(
            config.listen,
            lambda server: cache_authority_pb2_grpc.add_CacheAuthorityServicer_to_server(
                servicer, server
            ),
            [SERVICE_NAME],
            auth_token=config.auth_token,
            tls=config.tls,
        )
    except BaseException:
        servicer.close()
        engine.close()
        raise
    metrics_port = None
    if config.metrics_port is not None:
        host = config.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"
        metrics_port = metrics.serve(config.metrics_port, host=host)
    server = AuthorityServer(
        running.server,
        running.port,
        running.health,
        running.loop,
        running.service_names,
        engine=engine,
        metrics_port=metrics_port,
        servicer=servicer,
    )
    server.on_stop.extend([servicer.close, engine.close, metrics.stop])
    return server
