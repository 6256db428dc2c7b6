"""`positronic health`: exit 0 when a server answers gRPC health SERVING (for compose checks)."""

from __future__ import annotations

import argparse
import os

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from positronic import flags
from positronic.reachable import unavailable_hint
from positronic.rpc import open_channel


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", required=True, help="HOST:PORT of the server")
    p.add_argument("--service", default="", help="service name to check ('' = the server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default 3)")
    flags.add_client_tls_arguments(p)


def run(args: argparse.Namespace) -> int:
    try:
        tls = flags.client_tls(args, os.environ)
    except (ValueError, OSError) as e:
        print(f"{args.address}: {e}")
        return 2
    channel = open_channel(args.address, tls=tls)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as e:
        hint = unavailable_hint(e, args.address, tls is not None)
        print(f"{args.address}: {e.code().name}" + (f" ({hint})" if hint else ""))  # type: ignore[attr-defined]
        return 1
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{args.address}: {status}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1
