"""`positronic worker`: flags (or POSITRONIC_* environment variables; flags win) -> WorkerConfig
-> start_worker; prints the bound address as the first line of stdout; stops on SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping

from model_worker.model import FORWARDS
from model_worker.server import DEVICES, REPAIRERS, WorkerConfig, start_worker
from positronic import flags
from positronic.models import DEMO_MODEL, demo_model_dir
from positronic.rpc import bound_address, read_token_file

logger = logging.getLogger(__name__)

# flag dest -> environment variable
ENV = {
    "listen": "POSITRONIC_LISTEN",
    "model": "POSITRONIC_MODEL",
    "authority": "POSITRONIC_AUTHORITY",
    "repair": "POSITRONIC_REPAIR",
    "repair_model": "POSITRONIC_REPAIR_MODEL",
    "device": "POSITRONIC_DEVICE",
    "dtype": "POSITRONIC_DTYPE",
    "forward": "POSITRONIC_FORWARD",
    "tokenizer": "POSITRONIC_TOKENIZER",
    "auth_token_file": "POSITRONIC_AUTH_TOKEN_FILE",
    "metrics_port": "POSITRONIC_METRICS_PORT",
}
DEFAULTS = {
    "listen": "127.0.0.1:50052",
    "repair": "lm",
    "device": "auto",
    "dtype": "auto",
    "forward": "lean",
}
STOP_GRACE_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--listen", help="HOST:PORT to bind, port 0 picks one (default 127.0.0.1:50052)")
    a(
        "--model",
        help=f"causal LM: directory or Hugging Face id (default: the packaged {DEMO_MODEL})",
    )
    a("--authority", help="HOST:PORT of the cache authority (required)")
    a("--repair", choices=REPAIRERS, help="repairer (default lm)")
    a("--repair-model", help="masked LM for --repair mlm, e.g. distilbert-base-uncased")
    a("--device", help=f"one of {', '.join(DEVICES)} or cuda:N (default auto)")
    a("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="(default auto)")
    a(
        "--forward",
        choices=FORWARDS,
        help="lean: the worker's own Llama forward (same arithmetic, less per-op overhead; other "
        "models fall back to the library's); hf: always the library's (default lean)",
    )
    a("--tokenizer", help="tokenizer directory or id (default: the model's)")
    a("--auth-token-file", help="file holding the bearer token (server and authority calls)")
    a("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    flags.add_server_tls_arguments(parser)
    a(
        "--tls-ca",
        help="PEM CA of the authority's certificate: call it over TLS (with --tls-cert/--tls-key "
        "as the client certificate when it asks for one) [POSITRONIC_TLS_CA]",
    )
    a("--tls-server-name", help="name the authority's certificate carries, if not its host")
    parser.epilog = "Every flag can also be set by its environment variable: " + ", ".join(
        [*ENV.values(), *flags.TLS_ENV.values()]
    )


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> WorkerConfig:
    """Flags win over environment variables, which win over defaults."""
    values: dict[str, str | None] = {
        dest: flags.pick(args, dest, env, environ, DEFAULTS.get(dest)) for dest, env in ENV.items()
    }
    if not values["authority"]:
        raise ValueError("--authority (or POSITRONIC_AUTHORITY) is required")
    port = values["metrics_port"]
    return WorkerConfig(
        model=values["model"] or str(demo_model_dir()),
        authority=values["authority"],
        listen=values["listen"] or DEFAULTS["listen"],
        repair=values["repair"] or DEFAULTS["repair"],
        repair_model=values["repair_model"],
        device=values["device"] or DEFAULTS["device"],
        dtype=values["dtype"] or DEFAULTS["dtype"],
        forward=values["forward"] or DEFAULTS["forward"],
        tokenizer=values["tokenizer"],
        auth_token=read_token_file(values["auth_token_file"]),
        metrics_port=int(port) if port not in (None, "") else None,
        tls=flags.server_tls(args, environ),
        authority_tls=flags.client_tls(args, environ),
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args, os.environ)
    except (ValueError, OSError) as e:
        print(f"positronic worker: {e}", file=sys.stderr)
        return 2
    with contextlib.redirect_stdout(sys.stderr):  # the address must be stdout's first line
        running = start_worker(config)
    print(bound_address(config.listen, running.port), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    logger.info("stopping (grace %.0f s)", STOP_GRACE_S)
    running.stop(STOP_GRACE_S)
    return 0
