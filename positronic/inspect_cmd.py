"""`positronic inspect`: a session's mirror as a table for people (or JSON)."""

from __future__ import annotations

import argparse
import json
import os

import grpc

from positronic import flags
from positronic.reachable import unavailable_hint
from positronic.rpc import open_channel, read_token_file
from positronic.v1 import cache_authority_pb2, cache_authority_pb2_grpc, session_pb2

SOURCES = {
    session_pb2.TOKEN_SOURCE_STRUCTURAL: "structural",
    session_pb2.TOKEN_SOURCE_PROMPT: "prompt",
    session_pb2.TOKEN_SOURCE_GENERATED: "generated",
    session_pb2.TOKEN_SOURCE_MERGED: "merged",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--authority",
        default=os.environ.get("POSITRONIC_AUTHORITY"),
        required=False,
        help="HOST:PORT of the authority [POSITRONIC_AUTHORITY]",
    )
    p.add_argument("--session", help="session id (omit to list sessions)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--auth-token-file", default=os.environ.get("POSITRONIC_AUTH_TOKEN_FILE"))
    flags.add_client_tls_arguments(p)


def _rows(resp) -> list[dict]:
    return [
        {
            "position": m.position,
            "ledger_id": m.ledger_id,
            "token_id": m.token_id,
            "piece": m.piece,
            "brightness": round(m.brightness, 3),
            "source": SOURCES.get(m.source, "?"),
            "replaced": list(m.replaced_token_ids),
        }
        for m in resp.mirror
    ]


def run(args: argparse.Namespace) -> int:
    if not args.authority:
        print("inspect needs --authority HOST:PORT")
        return 2
    try:
        token = read_token_file(args.auth_token_file)
        tls = flags.client_tls(args, os.environ)
    except (ValueError, OSError) as e:
        print(f"inspect: {e}")
        return 2
    channel = open_channel(args.authority, token, tls=tls)
    stub = cache_authority_pb2_grpc.CacheAuthorityStub(channel)
    try:
        if not args.session:
            sessions = stub.ListSessions(cache_authority_pb2.ListSessionsRequest()).sessions
            for s in sessions:
                print(
                    f"{s.session_id}  version {s.version}  rows {s.row_count}/"
                    f"{s.budget.hard_max_rows}"
                )
            return 0
        resp = stub.GetSession(cache_authority_pb2.GetSessionRequest(session_id=args.session))
    except grpc.RpcError as e:
        print(f"{e.code().name}: {e.details()}")  # type: ignore[attr-defined]
        hint = unavailable_hint(e, args.authority, tls is not None)
        if hint:
            print(hint)
        return 1
    finally:
        channel.close()
    rows = _rows(resp)
    if args.json:
        print(
            json.dumps(
                {
                    "session_id": resp.session.session_id,
                    "version": resp.session.version,
                    "rows": rows,
                },
                ensure_ascii=False,
            )
        )
        return 0
    s = resp.session
    print(
        f"session {s.session_id}  version {s.version}  rows {s.row_count}  "
        f"target {s.budget.target_rows}  hard max {s.budget.hard_max_rows}"
    )
    print(f"{'pos':>5} {'token':>7} {'piece':<16} {'bright':>8}  {'source':<10} replaced")
    for r in rows:
        replaced = ",".join(map(str, r["replaced"]))
        print(
            f"{r['position']:>5} {r['token_id']:>7} {r['piece']!r:<16} "
            f"{r['brightness']:>8.2f}  {r['source']:<10} {replaced}"
        )
    return 0
