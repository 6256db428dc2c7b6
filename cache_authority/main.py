"""`positronic authority`: run the cache authority until SIGTERM or SIGINT.

Every flag can also come from the environment (POSITRONIC_LISTEN, POSITRONIC_DATA_DIR,
POSITRONIC_AUTH_TOKEN_FILE, POSITRONIC_METRICS_PORT, POSITRONIC_SNAPSHOT_EVERY,
POSITRONIC_DURABILITY, POSITRONIC_FSYNC_INTERVAL_MS); flags win.
The first line of stdout is the bound address, so `--listen 127.0.0.1:0` is usable by scripts.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping

from cache_authority.persistence import CorruptStore
from cache_authority.server import AuthorityConfig, start_authority
from positronic.rpc import bound_address, read_token_file

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", help="HOST:PORT to serve on; port 0 picks one (printed)")
    parser.add_argument("--data-dir", help="persist sessions here (WAL + snapshots)")
    parser.add_argument("--auth-token-file", help="file holding the bearer token clients need")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics here")
    parser.add_argument("--snapshot-every", type=int, help="versions between snapshots")
    parser.add_argument(
        "--durability",
        choices=("fsync", "batch", "none"),
        help="what a Patch reply promises (with --data-dir): fsync (default) - the patch is on "
        "stable storage; batch - written to the OS (survives an authority crash), fsynced by a "
        "background flusher at most --fsync-interval-ms later (a machine crash may lose the "
        "last interval); none - written to the OS, never fsynced by the authority",
    )
    parser.add_argument(
        "--fsync-interval-ms",
        type=int,
        help="how often the batch setting's flusher fsyncs the logs (default 100)",
    )


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> AuthorityConfig:
    """Flags first, then POSITRONIC_* variables, then AuthorityConfig's defaults."""

    def pick(flag: str, env: str) -> str | None:
        value = getattr(args, flag, None)
        return str(value) if value is not None else environ.get(env) or None

    listen = pick("listen", "POSITRONIC_LISTEN")
    metrics_port = pick("metrics_port", "POSITRONIC_METRICS_PORT")
    snapshot_every = pick("snapshot_every", "POSITRONIC_SNAPSHOT_EVERY")
    durability = pick("durability", "POSITRONIC_DURABILITY")
    fsync_interval_ms = pick("fsync_interval_ms", "POSITRONIC_FSYNC_INTERVAL_MS")
    kwargs: dict = {
        "data_dir": pick("data_dir", "POSITRONIC_DATA_DIR"),
        "auth_token": read_token_file(pick("auth_token_file", "POSITRONIC_AUTH_TOKEN_FILE")),
        "metrics_port": int(metrics_port) if metrics_port is not None else None,
    }
    if listen is not None:
        kwargs["listen"] = listen
    if snapshot_every is not None:
        kwargs["snapshot_every"] = int(snapshot_every)
    if durability is not None:
        kwargs["durability"] = durability
    if fsync_interval_ms is not None:
        kwargs["fsync_interval_ms"] = int(fsync_interval_ms)
    return AuthorityConfig(**kwargs)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args, os.environ)
    except (ValueError, OSError) as e:
        print(f"positronic authority: {e}", file=sys.stderr)
        return 2
    # Handlers first: a SIGTERM that arrives right after the address is printed (a supervisor
    # or a test that stops the process at once) must still stop it gracefully.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        server = start_authority(config)
    except (OSError, CorruptStore) as e:  # port taken, data dir unreadable or damaged
        logger.error("cannot start: %s", e)
        return 1
    print(bound_address(config.listen, server.port), flush=True)
    if config.data_dir is None:
        print(
            "positronic authority: no --data-dir: sessions live in memory only and are lost "
            "when the process ends",
            file=sys.stderr,
            flush=True,
        )
    if server.metrics_port is not None:
        logger.info("metrics on port %d", server.metrics_port)
    while not stop.wait(0.5):  # a timed wait lets the main thread run the signal handlers
        pass
    logger.info("stopping (grace %.1f s)", config.grace_s)
    server.stop(config.grace_s)
    return 0
