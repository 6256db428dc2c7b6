"""Summaries of a WireRecorder's records: latency percentiles, bytes per iteration (and what
they grow with), throughput in windows along the generation. Pure functions."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from positronic.bench.wire import CallRecord, Iteration

RATE_AT = (100, 1000, 10000)  # tokens/s is reported around these token indices
RATE_HALF_WINDOW = 50  # ... over this many tokens each side


def summarize_latency(calls: Sequence[CallRecord]) -> dict[str, dict[str, Any]]:
    """Per RPC: calls, p50 and p99 latency (ms), the p50 over each tenth of its calls, mean
    request and response bytes."""
    by: dict[str, list[CallRecord]] = defaultdict(list)
    for c in calls:
        by[c.method].append(c)
    out = {}
    for name, records in sorted(by.items()):
        ms = np.array([r.latency_s * 1e3 for r in records])
        out[name] = {
            "calls": len(records),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            # In call order: does an RPC get slower as the generation goes on?
            "p50_ms_by_tenth": [float(np.median(t)) for t in np.array_split(ms, 10) if t.size]
            if ms.size >= 20
            else [],
            "mean_request_bytes": float(np.mean([r.request_bytes for r in records])),
            "mean_response_bytes": float(np.mean([r.response_bytes for r in records])),
        }
    return out


def rate_windows(stamps: Sequence[float], at: Sequence[int] = RATE_AT) -> dict[str, float]:
    """Tokens/s around token k (stamps[k] is when token k was done), for each k the run
    reached, and over the last 2·RATE_HALF_WINDOW tokens ("end")."""
    out: dict[str, float] = {}
    h = RATE_HALF_WINDOW
    n = len(stamps)
    for k in at:
        if k + h < n and k - h >= 0:
            out[str(k)] = 2 * h / (stamps[k + h] - stamps[k - h])
    if n > 2 * h:
        out["end"] = 2 * h / (stamps[-1] - stamps[-1 - 2 * h])
    return out


def rate_by_tenth(stamps: Sequence[float]) -> list[float]:
    """Tokens/s over each tenth of the run (empty when it has fewer than 20 tokens)."""
    n = len(stamps)
    if n < 20:
        return []
    edges = np.linspace(0, n - 1, 11).round().astype(int)
    return [float((b - a) / (stamps[b] - stamps[a])) for a, b in itertools.pairwise(edges.tolist())]


def hop_bytes(calls: Sequence[CallRecord], sync_bytes: int, iterations: int) -> dict[str, float]:
    """Mean bytes per iteration on each hop a token's K/V crosses: worker -> driver (the
    responses of the per-token compute calls: Tick, or Step/Repair/ComputeKV), driver ->
    authority (the Patch requests, the prime's excluded), authority -> worker (the replica's
    Sync, pulls and follow streams)."""
    per_token = ("Tick", "Step", "Repair", "ComputeKV")
    patches = [c.request_bytes for c in calls if c.method == "Patch"][1:]
    n = max(iterations, 1)
    return {
        "worker_to_driver": sum(c.response_bytes for c in calls if c.method in per_token) / n,
        "driver_to_authority": sum(patches) / n,
        "authority_to_worker": sync_bytes / n,
    }


def iteration_bytes(
    iterations: Sequence[Iteration], sync_bytes: int, calls: Sequence[CallRecord] = ()
) -> dict:
    """Bytes per iteration: the driver's RPCs (measured per iteration) plus the worker's Sync
    from the authority (a total, spread evenly), per hop, and how the driver's part depends on
    the edits and on the cache size (least squares: bytes = fixed + per_row · rows)."""
    if not iterations:
        return {}
    b = np.array([it.bytes for it in iterations], dtype=np.float64)
    rows = np.array([it.rows for it in iterations], dtype=np.float64)
    edited = np.array([it.edited for it in iterations])
    n = len(iterations)
    out: dict = {
        "per_iteration": float(b.mean() + sync_bytes / n),
        "driver_per_iteration": float(b.mean()),
        "sync_per_iteration": sync_bytes / n,
        "plain_iterations": int((~edited).sum()),
        "edited_iterations": int(edited.sum()),
        "per_hop": hop_bytes(calls, sync_bytes, n),
    }
    if (~edited).any():
        out["driver_per_plain_iteration"] = float(b[~edited].mean())
    if edited.any():
        out["driver_per_edited_iteration"] = float(b[edited].mean())
    plain = ~edited
    if plain.sum() >= 2 and np.ptp(rows[plain]) > 0:
        slope, intercept = np.polyfit(rows[plain], b[plain], 1)
        out["driver_bytes_fit"] = {
            "fixed": float(intercept),
            "per_row": float(slope),
            "rows_range": [int(rows[plain].min()), int(rows[plain].max())],
        }
    return out
