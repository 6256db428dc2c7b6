"""`positronic bench patch`: what one Patch costs the cache authority, as a loop tick sends it.

Each case is a session of `rows` rows at a model geometry (TinyLlama-1.1B's by default: 22
layers, 4 KV heads, head dim 64, float16) receiving patches shaped like a real tick:
  merge:  SetBrightness(rows) + ReplacePair at row 5 + Append of 1 row (rows stay constant);
  evict:  SetBrightness(rows) + Evict at row 5 + Append of 1 row (rows stay constant);
  append: SetBrightness(rows - 1) + Append of 1 row onto rows - 1 rows (an untimed Evict of the
          last row follows each, so every timed patch meets the same row count).
Row 5 is where the `halo` policy merges (the oldest pair after its 4 protected sinks).

Durability `fsync` and `none` run against an authority with a data directory (write-ahead log
and snapshots every 1,000 versions, as deployed); `memory` has no data directory. Transport
`grpc` (the default, the honest one) times the Patch RPC as a client sees it, against
`positronic authority` in its own process on loopback; `engine` calls the patch engine in this
process (no serialization, no network), for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EDITS = ("append", "merge", "evict")
DURABILITY = ("fsync", "none", "memory")
EDIT_ROW = 5  # where halo merges: the oldest pair after 4 sinks
PATCH_SEED = 0


@dataclass(frozen=True)
class Shape:
    layers: int = 22
    kv_heads: int = 4
    head_dim: int = 64
    dtype: str = "float16"
    vocab: int = 32000


@dataclass(frozen=True)
class Case:
    rows: int
    edit: str
    durability: str


def add_patch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", default="256,1024,2048", help="row counts (default 256,1024,2048)")
    p.add_argument("--edits", default=",".join(EDITS), help=f"default {','.join(EDITS)}")
    p.add_argument(
        "--durability",
        default="fsync,none",
        help="authority durability settings to measure: fsync, none (both with a data dir) "
        "and memory (no data dir); default fsync,none",
    )
    p.add_argument("--patches", type=int, default=1000, help="timed patches per case")
    p.add_argument("--warmup", type=int, default=50, help="untimed patches before them")
    p.add_argument(
        "--transport",
        choices=("grpc", "engine"),
        default="grpc",
        help="grpc: Patch RPCs to an authority process (default); engine: in-process calls",
    )
    p.add_argument("--layers", type=int, default=Shape.layers)
    p.add_argument("--kv-heads", type=int, default=Shape.kv_heads)
    p.add_argument("--head-dim", type=int, default=Shape.head_dim)
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=Shape.dtype)
    p.add_argument("--snapshot-every", type=int, default=1000, help="authority setting")
    p.add_argument(
        "--follower",
        action="store_true",
        help="after each patch, pull it with Sync (untimed) as a worker's replica does",
    )
    p.add_argument("--data-dir", help="where the authority keeps its files (default: a temp dir)")
    p.add_argument("--json", help="write the results here")


def plan_cases(args: argparse.Namespace) -> list[Case]:
    rows = [int(r) for r in args.rows.split(",") if r.strip()]
    edits = [e.strip() for e in args.edits.split(",") if e.strip()]
    modes = [d.strip() for d in args.durability.split(",") if d.strip()]
    for e in edits:
        if e not in EDITS:
            raise ValueError(f"unknown edit {e!r}; choose from {', '.join(EDITS)}")
    for d in modes:
        if d not in DURABILITY:
            raise ValueError(f"unknown durability {d!r}; choose from {', '.join(DURABILITY)}")
    if any(r < EDIT_ROW + 3 for r in rows):
        raise ValueError(f"rows must be at least {EDIT_ROW + 3}")
    if args.patches < 1 or args.warmup < 0:
        raise ValueError("--patches must be positive and --warmup not negative")
    return [Case(r, e, d) for d in modes for r in rows for e in edits]


# -- one session's ticks ----------------------------------------------------------------------


class Ticks:
    """The client's view of one session (its tokens) and the next patch a tick sends."""

    def __init__(self, shape: Shape, rows: int, edit: str, seed: int = PATCH_SEED):
        import torch

        from positronic import codec

        self.shape, self.edit = shape, edit
        self.rng = np.random.default_rng(seed)
        dtype = getattr(torch, shape.dtype)
        g = torch.Generator().manual_seed(seed)
        kv_shape = (shape.layers, shape.kv_heads, 1, shape.head_dim)
        # A few single-row K/V blocks, encoded once: the client's cost is not what is measured.
        self.pool = [
            codec.encode_kv(
                torch.randn(kv_shape, generator=g).to(dtype),
                torch.randn(kv_shape, generator=g).to(dtype),
            )
            for _ in range(8)
        ]
        self.start_rows = rows - 1 if edit == "append" else rows
        self.tokens: list[int] = []
        self.version = 0

    def prime_ops(self) -> list:
        """Append ops of the initial rows, each small enough for one stream message."""
        import torch

        from positronic import codec
        from positronic.v1 import session_pb2

        s = self.shape
        dtype = getattr(torch, s.dtype)
        row_bytes = 2 * s.layers * s.kv_heads * s.head_dim * dtype.itemsize
        per_op = max(1, (1 << 20) // row_bytes)
        g = torch.Generator().manual_seed(PATCH_SEED + 1)
        ops = []
        for first in range(0, self.start_rows, per_op):
            n = min(per_op, self.start_rows - first)
            shape = (s.layers, s.kv_heads, n, s.head_dim)
            ids = self.rng.integers(0, s.vocab, n).tolist()
            ops.append(
                session_pb2.PatchOp(
                    append=session_pb2.AppendOp(
                        position=first,
                        token_ids=ids,
                        kv=codec.encode_kv(
                            torch.randn(shape, generator=g).to(dtype),
                            torch.randn(shape, generator=g).to(dtype),
                        ),
                        pieces=["x"] * n,
                    )
                )
            )
            self.tokens += ids
        return ops

    def tick_ops(self, i: int) -> list:
        """SetBrightness + the edit + Append of 1 row; the view follows."""
        from positronic.v1 import session_pb2 as pb

        n = len(self.tokens)
        kv = self.pool[i % len(self.pool)]
        ops = [
            pb.PatchOp(
                set_brightness=pb.SetBrightnessOp(
                    expected_row_count=n, brightness=self.rng.random(n, dtype=np.float32).tolist()
                )
            )
        ]
        p = EDIT_ROW
        if self.edit == "merge":
            new = int(self.rng.integers(0, self.shape.vocab))
            ops.append(
                pb.PatchOp(
                    replace_pair=pb.ReplacePairOp(
                        position=p, expected_token_ids=self.tokens[p : p + 2], token_id=new,
                        kv=kv, piece="m", brightness=1.0,
                    )
                )
            )  # fmt: skip
            self.tokens[p : p + 2] = [new]
        elif self.edit == "evict":
            ops.append(pb.PatchOp(evict=pb.EvictOp(position=p, expected_token_id=self.tokens[p])))
            del self.tokens[p]
        token = int(self.rng.integers(0, self.shape.vocab))
        ops.append(
            pb.PatchOp(append=pb.AppendOp(position=n, token_ids=[token], kv=kv, pieces=["t"]))
        )
        self.tokens.append(token)
        return ops

    def reset_ops(self) -> list:
        """After an append-only tick: evict the last row again (untimed)."""
        from positronic.v1 import session_pb2 as pb

        if self.edit != "append":
            return []
        n = len(self.tokens) - 1
        op = pb.PatchOp(evict=pb.EvictOp(position=n, expected_token_id=self.tokens[n]))
        self.tokens.pop()
        return [op]


# -- transports -------------------------------------------------------------------------------

# (session id, expected version, ops) -> (durable, server apply ns)
PatchFn = Callable[[str, int, list], tuple[bool, int]]


@dataclass
class Authority:
    create: Callable[[str, int], None]  # (session id, hard max rows)
    patch: PatchFn
    delete: Callable[[str], object]
    follow: Callable[[str, int], None]  # a replica's Sync of the patches after a version


def _geometry_pb(shape: Shape):
    import torch

    from positronic import codec
    from positronic.rope import Rope
    from positronic.v1 import session_pb2

    return session_pb2.ModelGeometry(
        num_layers=shape.layers,
        num_kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        dtype=codec.dtype_to_wire(getattr(torch, shape.dtype)),
        rope=session_pb2.RopeParameters(
            rope_type="default",
            rope_theta=10000.0,
            inv_freq=Rope.from_theta(shape.head_dim).inv_freq.tolist(),
        ),
        vocab_size=shape.vocab,
        model_fingerprint="bench-patch",
    )


@contextmanager
def grpc_authority(
    shape: Shape, durability: str, data_dir: str, snapshot_every: int
) -> Iterator[Authority]:
    """`positronic authority` in its own process, and a client of it."""
    from positronic import rpc
    from positronic.bench.processes import service
    from positronic.clients import patch_requests
    from positronic.v1 import cache_authority_pb2 as ca
    from positronic.v1 import cache_authority_pb2_grpc, session_pb2

    args = ["authority", "--listen", "127.0.0.1:0", "--snapshot-every", str(snapshot_every)]
    if durability != "memory":
        args += ["--data-dir", data_dir, "--durability", durability]
    with service(args, Path(data_dir).parent / f"authority-{durability}.log") as (_, address):
        channel = rpc.open_channel(address)
        stub = cache_authority_pb2_grpc.CacheAuthorityStub(channel)
        geometry = _geometry_pb(shape)

        def create(sid: str, hard_max: int) -> None:
            budget = session_pb2.Budget(target_rows=hard_max, hard_max_rows=hard_max)
            stub.CreateSession(
                ca.CreateSessionRequest(session_id=sid, geometry=geometry, budget=budget),
                timeout=60,
            )

        def patch(sid: str, version: int, ops: list) -> tuple[bool, int]:
            requests = patch_requests(sid, version, uuid.uuid4().hex, ops)
            resp = stub.Patch(requests, timeout=300)
            return resp.durable, resp.apply_ns

        def delete(sid: str) -> None:
            stub.DeleteSession(ca.DeleteSessionRequest(session_id=sid), timeout=60)

        def follow(sid: str, version: int) -> None:
            call = stub.Sync(ca.SyncRequest(session_id=sid, from_version=version), timeout=60)
            for msg in call:
                if msg.WhichOneof("payload") == "delta" and msg.delta.final:
                    break
            call.cancel()

        try:
            yield Authority(create, patch, delete, follow)
        finally:
            channel.close()


@contextmanager
def engine_authority(
    shape: Shape, durability: str, data_dir: str, snapshot_every: int
) -> Iterator[Authority]:
    """The patch engine in this process, called directly."""
    from cache_authority.convert import geometry_from_pb
    from cache_authority.engine import Engine
    from cache_authority.persistence import SessionStore
    from cache_authority.rows import Budget
    from cache_authority.sessions import EngineLimits

    store = None if durability == "memory" else SessionStore(data_dir, durability=durability)
    engine = Engine(EngineLimits(snapshot_every=snapshot_every), store)
    geometry = geometry_from_pb(_geometry_pb(shape))

    def create(sid: str, hard_max: int) -> None:
        engine.create_session(sid, geometry, Budget(hard_max, hard_max), 0.0, lambda s: None)

    def patch(sid: str, version: int, ops: list) -> tuple[bool, int]:
        result = engine.patch(sid, version, uuid.uuid4().hex, ops)
        return result.durable, result.apply_ns

    def follow(sid: str, version: int) -> None:
        engine.sync_plan(sid, version, holds_state=True)

    try:
        yield Authority(create, patch, engine.delete_session, follow)
    finally:
        engine.close()


# -- measuring --------------------------------------------------------------------------------


def summarize(ms: Sequence[float]) -> dict:
    """p50/p99/max/mean of latencies in ms, p50 per tenth, and of the first and last 1,000."""
    a = np.asarray(ms, dtype=np.float64)
    out = {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "max_ms": float(a.max()),
        "mean_ms": float(a.mean()),
        "p50_ms_by_tenth": [float(np.median(t)) for t in np.array_split(a, 10)]
        if a.size >= 20
        else [],
    }
    if a.size >= 2000:
        out["p50_ms_first_1000"] = float(np.median(a[:1000]))
        out["p50_ms_last_1000"] = float(np.median(a[-1000:]))
    return out


def measure_case(
    authority: Authority, shape: Shape, case: Case, patches: int, warmup: int, follow: bool
):
    sid = f"bench-{case.rows}-{case.edit}"
    ticks = Ticks(shape, case.rows, case.edit)
    authority.create(sid, case.rows)
    version = 0
    authority.patch(sid, version, ticks.prime_ops())
    version += 1
    client_ms, server_ms = [], []
    durable = False
    for i in range(warmup + patches):
        ops = ticks.tick_ops(i)
        t0 = time.perf_counter()
        durable, apply_ns = authority.patch(sid, version, ops)
        elapsed = time.perf_counter() - t0
        version += 1
        if i >= warmup:
            client_ms.append(elapsed * 1e3)
            server_ms.append(apply_ns / 1e6)
        if follow:  # untimed, as a worker's replica pulls each commit in the loop
            authority.follow(sid, version - 1)
        reset = ticks.reset_ops()
        if reset:
            authority.patch(sid, version, reset)
            version += 1
    authority.delete(sid)
    server = summarize(server_ms)
    return {
        "rows": case.rows,
        "edit": case.edit,
        "fsync": case.durability == "fsync",
        "durability": case.durability,
        "durable": durable,
        "patches": patches,
        **summarize(client_ms),
        "server_p50_ms": server["p50_ms"],
        "server_p99_ms": server["p99_ms"],
        "server_max_ms": server["max_ms"],
    }


def table(cases: list[dict]) -> str:
    lines = [
        f"{'rows':>5} {'edit':<7} {'durability':<10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
        f" {'server p50':>10} {'server p99':>10}"
    ]
    for c in cases:
        lines.append(
            f"{c['rows']:>5} {c['edit']:<7} {c['durability']:<10} {c['p50_ms']:>8.2f} "
            f"{c['p99_ms']:>8.2f} {c['max_ms']:>8.2f} {c['server_p50_ms']:>10.2f} "
            f"{c['server_p99_ms']:>10.2f}"
        )
        if "p50_ms_first_1000" in c:
            lines.append(
                f"      p50 first 1,000 {c['p50_ms_first_1000']:.2f} ms, last 1,000 "
                f"{c['p50_ms_last_1000']:.2f} ms; by tenth "
                + " ".join(f"{x:.2f}" for x in c["p50_ms_by_tenth"])
            )
    return "\n".join(lines)


def run_patch(args: argparse.Namespace) -> int:
    try:
        cases = plan_cases(args)
    except ValueError as e:
        print(f"positronic bench patch: {e}", file=sys.stderr)
        return 2
    shape = Shape(args.layers, args.kv_heads, args.head_dim, args.dtype)
    connect = grpc_authority if args.transport == "grpc" else engine_authority
    results: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="positronic-bench-patch-") as tmp:
        root = Path(args.data_dir or tmp)
        for durability in dict.fromkeys(c.durability for c in cases):
            data_dir = root / f"data-{durability}"
            data_dir.mkdir(parents=True, exist_ok=True)
            with connect(shape, durability, str(data_dir), args.snapshot_every) as authority:
                for case in (c for c in cases if c.durability == durability):
                    print(f"measuring {case}", file=sys.stderr, flush=True)
                    results.append(
                        measure_case(
                            authority, shape, case, args.patches, args.warmup, args.follower
                        )
                    )
    doc = {
        "transport": args.transport,
        "shape": shape.__dict__,
        "edit_row": EDIT_ROW,
        "patches": args.patches,
        "warmup": args.warmup,
        "snapshot_every": args.snapshot_every,
        "follower": args.follower,
        "cases": results,
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0
