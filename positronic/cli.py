"""The `positronic` command: tokenize, authority, worker, generate, inspect, view, health, bench."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand -> module with add_arguments(parser) and run(args) -> int. Imported lazily so that
# `positronic tokenize` does not pay for grpc servers and `authority` does not load transformers.
SUBCOMMANDS = {
    "tokenize": ("positronic.tokenize_cmd", "print the exact ids and pieces the cache would get"),
    "authority": ("cache_authority.main", "run the cache authority (the single writer)"),
    "worker": ("model_worker.main", "run a model worker (read-only forward passes)"),
    "generate": ("positronic.generate_cmd", "generate text with a bounded cache"),
    "inspect": ("positronic.inspect_cmd", "show a session's mirror as a table"),
    "view": ("positronic.view.main", "a live web page of a session (or of every session)"),
    "health": ("positronic.health_cmd", "exit 0 when a server answers gRPC health SERVING"),
    "bench": ("positronic.bench.cli", "quality and speed benchmarks"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="positronic", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    # Only import the module of the subcommand being run (and all of them for --help).
    wanted = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if wanted in (None, name):
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name and e.name.startswith(module_name.split(".")[0]):
                    continue  # subcommand not built yet
                raise
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not hasattr(args, "_run"):
        parser.error(f"{args.command} is not available in this build")
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
