"""Both services in this process on loopback ports: the same gRPC code path as a split
deployment, for `positronic generate` without addresses, tests and benchmarks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddedAddresses:
    authority: str
    worker: str


@contextlib.contextmanager
def embedded_services(
    model: str,
    *,
    repair: str = "lm",
    repair_model: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    data_dir: str | None = None,
    auth_token: str | None = None,
) -> Iterator[EmbeddedAddresses]:
    """Start an authority and a worker on 127.0.0.1 ports; stop both on exit."""
    from cache_authority.server import AuthorityConfig, start_authority
    from model_worker.server import WorkerConfig, start_worker

    authority = start_authority(
        AuthorityConfig(listen="127.0.0.1:0", data_dir=data_dir, auth_token=auth_token)
    )
    try:
        authority_address = f"127.0.0.1:{authority.port}"
        worker = start_worker(
            WorkerConfig(
                model=model,
                authority=authority_address,
                listen="127.0.0.1:0",
                repair=repair,
                repair_model=repair_model,
                device=device,
                dtype=dtype,
                auth_token=auth_token,
            )
        )
        try:
            yield EmbeddedAddresses(authority_address, f"127.0.0.1:{worker.port}")
        finally:
            worker.stop(grace=1.0)
    finally:
        authority.stop(grace=1.0)
