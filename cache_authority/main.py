"""`positronic authority`: run the cache authority until SIGTERM or SIGINT.

Every flag can also come from the environment (POSITRONIC_LISTEN, POSITRONIC_DATA_DIR,
POSITRONIC_AUTH_TOKEN_FILE, POSITRONIC_METRICS_PORT, POSITRONIC_SNAPSHOT_EVERY,
POSITRONIC_MAX_STREAMS_PER_CLIENT, POSITRONIC_MAX_STREAMS_PER_SESSION, POSITRONIC_TLS_CERT,
POSITRONIC_TLS_KEY, POSITRONIC_TLS_CLIENT_CA, POSITRONIC_DURABILITY,
POSITRONIC_FSYNC_INTERVAL_MS); flags win (positronic/flags.py).
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
from positronic import flags
from positronic.rpc import bound_address, read_token_file

logger = logging.getLogger(__name__)

# AuthorityConfig field -> environment variable, for the integer settings
INT_SETTINGS = {
    "metrics_port": "POSITRONIC_METRICS_PORT",
    "snapshot_every": "POSITRONIC_SNAPSHOT_EVERY",
    "max_streams_per_client": "POSITRONIC_MAX_STREAMS_PER_CLIENT",
    "max_streams_per_session": "POSITRONIC_MAX_STREAMS_PER_SESSION",
    "max_all_session_watches": "POSITRONIC_MAX_ALL_SESSION_WATCHES",
    "fsync_interval_ms": "POSITRONIC_FSYNC_INTERVAL_MS",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", help="HOST:PORT to serve on; port 0 picks one (printed)")
    parser.add_argument("--data-dir", help="persist sessions here (WAL + snapshots)")
    parser.add_argument("--auth-token-file", help="file holding the bearer token clients need")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics here")
    parser.add_argument("--snapshot-every", type=int, help="versions between snapshots")
    parser.add_argument(
        "--max-streams-per-client",
        type=int,
        help="open Patch/Sync/Watch streams one client address may hold (default 1024)",
    )
    parser.add_argument(
        "--max-streams-per-session",
        type=int,
        help="open streams that may name one session (default 64)",
    )
    parser.add_argument(
        "--max-all-session-watches",
        type=int,
        help="open Watches of every session (empty session id), in all (default 64): each "
        "costs a message per commit of any session",
    )
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
    flags.add_server_tls_arguments(parser)


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> AuthorityConfig:
    """Flags first, then POSITRONIC_* variables, then AuthorityConfig's defaults."""
    kwargs: dict = {
        "data_dir": flags.pick(args, "data_dir", "POSITRONIC_DATA_DIR", environ),
        "auth_token": read_token_file(
            flags.pick(args, "auth_token_file", "POSITRONIC_AUTH_TOKEN_FILE", environ)
        ),
        "tls": flags.server_tls(args, environ),
    }
    listen = flags.pick(args, "listen", "POSITRONIC_LISTEN", environ)
    if listen is not None:
        kwargs["listen"] = listen
    for name, env in INT_SETTINGS.items():
        value = flags.pick_int(args, name, env, environ)
        if value is not None or name == "metrics_port":
            kwargs[name] = value
    durability = flags.pick(args, "durability", "POSITRONIC_DURABILITY", environ)
    if durability is not None:
        kwargs["durability"] = durability
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
