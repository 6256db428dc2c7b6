"""`positronic generate`: run the loop; the prompt and its continuation to stdout (exactly the
text), a progress line and logs to stderr, stats to JSON."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time

import grpc

from positronic import flags
from positronic.clients import Endpoints
from positronic.loop import REDUCTIONS, Loop, LoopConfig, LoopConfigError, LoopError
from positronic.models import DEMO_MODEL, demo_model_dir
from positronic.policies import POLICIES, make_policy
from positronic.progress_line import ProgressLine, choose_mode
from positronic.reachable import ConnectionSetupError, check_channel
from positronic.rpc import read_token_file

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument(
        "--prompt-file", help="file holding the prompt (UTF-8; its exact text, \\r included)"
    )
    p.add_argument(
        "--model",
        default=env("POSITRONIC_MODEL"),
        help=f"model directory or hub id, loaded in embedded mode (default: the packaged "
        f"{DEMO_MODEL} demo model) [POSITRONIC_MODEL]",
    )
    p.add_argument(
        "--echo-prompt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print the prompt before its continuation (default: on)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress line on stderr (default: when stderr is a terminal)",
    )
    p.add_argument(
        "--worker",
        default=env("POSITRONIC_WORKER"),
        help="HOST:PORT of a running worker; several workers as A:P,B:P or dns:///NAME:PORT "
        "(calls go round-robin, a lost worker's calls are retried on the others) "
        "[POSITRONIC_WORKER]",
    )
    p.add_argument(
        "--authority",
        default=env("POSITRONIC_AUTHORITY"),
        help="HOST:PORT of a running authority [POSITRONIC_AUTHORITY]",
    )
    p.add_argument("--policy", default="halo", choices=sorted(POLICIES))
    p.add_argument("--target-size", type=int, default=96, help="rows to compact to (default 96)")
    p.add_argument(
        "--hard-max", type=int, default=0, help="rows never exceeded (default target+32)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument(
        "--attention-reduction",
        default="last",
        choices=sorted(REDUCTIONS),
        help="how per-layer attention rows become one (default: last layer)",
    )
    p.add_argument(
        "--recent-window",
        type=int,
        default=None,
        help="newest rows no policy may touch (policy default)",
    )
    p.add_argument("--stop-at-eos", action="store_true", help="stop when the model emits EOS")
    p.add_argument("--stats-json", help="write run statistics to this file")
    p.add_argument("--repair", default="lm", choices=("lm", "mlm"), help="embedded mode repairer")
    p.add_argument("--repair-model", help="masked LM for --repair mlm (embedded mode)")
    p.add_argument("--device", default="cpu", help="embedded mode device (cpu, cuda, auto)")
    p.add_argument("--dtype", default="auto", help="embedded mode dtype")
    p.add_argument(
        "--auth-token-file",
        default=env("POSITRONIC_AUTH_TOKEN_FILE"),
        help="bearer token for both services [POSITRONIC_AUTH_TOKEN_FILE]",
    )
    flags.add_client_tls_arguments(p)


def _config(args: argparse.Namespace, progress_line: bool) -> LoopConfig:
    overrides = {}
    if args.recent_window is not None:
        overrides["recent_window"] = args.recent_window
    return LoopConfig(
        policy=make_policy(args.policy, **overrides),
        target_rows=args.target_size,
        hard_max_rows=args.hard_max,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        attention_reduction=args.attention_reduction,
        stop_at_eos=args.stop_at_eos,
        progress_every=0 if progress_line else LoopConfig.progress_every,
    )


class Status:
    """The progress line's text; the rate counts from the first line (loading and priming
    excluded)."""

    def __init__(self, steps: int):
        self.steps = steps
        self.loop: Loop | None = None
        self._start: tuple[float, int] | None = None

    def __call__(self) -> str:
        if self.loop is None:
            return ""
        stats = self.loop.stats
        now = time.perf_counter()
        if self._start is None:
            self._start = (now, stats.iterations)
        t0, i0 = self._start
        rate = (stats.iterations - i0) / (now - t0) if now > t0 else 0.0
        return (
            f"{stats.iterations}/{self.steps} tokens, {rate:.1f} tokens/s, "
            f"max rows {stats.max_rows}/{stats.hard_max}, "
            f"{stats.merges} merges, {stats.evictions} evictions"
        )


def run(args: argparse.Namespace) -> int:
    try:
        prompt = flags.read_text_file(args.prompt_file) if args.prompt_file else args.prompt
    except ValueError as e:
        logger.error("--prompt-file %s", e)
        return 2
    if bool(args.worker) != bool(args.authority):
        logger.error("give both --worker and --authority, or neither (embedded mode)")
        return 2
    model = args.model or str(demo_model_dir())
    mode = choose_mode(sys.stdout, sys.stderr, args.progress, os.environ.get("TERM"))
    try:
        config = _config(args, progress_line=mode != "off")
    except ValueError as e:
        logger.error("%s", e)
        return 2
    try:
        token = read_token_file(args.auth_token_file)
        tls = flags.client_tls(args, os.environ)
    except (ValueError, OSError) as e:
        logger.error("%s", e)
        return 2
    echo = [prompt] if args.echo_prompt else []  # printed with the first text: logs come before

    with contextlib.ExitStack() as stack:
        if args.worker:
            authority, worker = args.authority, args.worker
        else:
            from positronic.embedded import embedded_services

            logger.info("embedded mode: starting authority and worker for %s", model)
            addrs = stack.enter_context(
                embedded_services(
                    model,
                    repair=args.repair,
                    repair_model=args.repair_model,
                    device=args.device,
                    dtype=args.dtype,
                    auth_token=token,
                )
            )
            authority, worker = addrs.authority, addrs.worker
        endpoints = Endpoints.connect(authority, worker, token, tls if args.worker else None)
        stack.callback(endpoints.close)
        if args.worker:
            try:
                a, w = endpoints.channels
                for channel, address, what in (
                    (a, authority, "the authority"),
                    (w, worker, "the worker"),
                ):
                    check_channel(channel, address, what, tls=tls is not None)
            except ConnectionSetupError as e:
                logger.error("%s", e)
                return 1
        status = Status(config.max_new_tokens)
        line = ProgressLine(sys.stdout, sys.stderr, mode, status)

        def write(text: str) -> None:
            line.write_text((echo.pop() if echo else "") + text)

        try:
            status.loop = Loop(endpoints, config, write)
            with line.running():
                stats = status.loop.run(prompt)
        except LoopConfigError as e:  # the settings cannot work with this model: a usage error
            logger.error("%s", e)
            return 2
        except LoopError as e:
            logger.error("%s", e)
            return 1
        except grpc.RpcError as e:
            logger.error("%s: %s", e.code().name, e.details())  # type: ignore[attr-defined]
            return 1
    sys.stdout.write((echo.pop() if echo else "") + "\n")
    logger.info(
        "%d tokens in %.1fs (%.1f tokens/s), %d merges, %d evictions, max rows %d/%d",
        stats.tokens_generated,
        stats.elapsed_s,
        stats.tokens_per_s,
        stats.merges,
        stats.evictions,
        stats.max_rows,
        stats.hard_max,
    )
    if args.stats_json:
        with open(args.stats_json, "w", encoding="utf-8") as f:
            json.dump(stats.to_json(), f, indent=2)
            f.write("\n")
    return 0
