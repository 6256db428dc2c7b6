"""Limits on every request field of the ModelWorker (stated in model_worker.proto), and the checks
every RPC shares: the session it names, the digest it must name.

A field over its limit is RESOURCE_EXHAUSTED; a malformed one INVALID_ARGUMENT. Messages echo at
most `ECHO_CHARS` characters of what the client sent.
"""

from __future__ import annotations

import re
from collections.abc import Sized

from model_worker.errors import WorkerError, invalid

MAX_TEXT_BYTES = 1 << 20  # Tokenize: UTF-8 bytes of text
MAX_IDS = 1 << 16  # Detokenize ids, Prefill token_ids
MAX_INSERTIONS = 256  # ComputeKV insertions
MAX_PAIRS = 256  # Repair pairs
MAX_TOP_LOGPROBS = 100  # Step top_logprobs
MAX_CANDIDATES = 100  # Repair max_candidates
DIGEST_BYTES = 32  # sha256, as the authority's digest chain
ECHO_CHARS = 32
# As the authority's session ids (cache_authority/sessions.py).
SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def echo(value: object) -> str:
    """A bounded, printable prefix of client input for an error message."""
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "..."


def over(what: str, count: int, limit: int) -> WorkerError:
    return WorkerError("RESOURCE_EXHAUSTED", f"{what}: {count} is over the limit of {limit}")


def check_count(what: str, items: Sized, limit: int) -> None:
    if len(items) > limit:
        raise over(what, len(items), limit)


def check_session(session_id: str, version: int) -> None:
    if not SESSION_ID.fullmatch(session_id):
        raise invalid(f"session id {echo(session_id)} must match {SESSION_ID.pattern}")
    if version < 0:
        raise invalid(f"version must be >= 0, got {version}")


def check_digest(digest: bytes) -> None:
    """Compute calls name the session's digest at their version: without it a re-created session
    id could be computed on with a deleted session's rows (issue 12)."""
    if not digest:
        raise invalid("expected_digest is required (the session's digest at `version`)")
    if len(digest) != DIGEST_BYTES:
        raise invalid(f"expected_digest must be {DIGEST_BYTES} bytes, got {len(digest)}")


def check_compute(session_id: str, version: int, digest: bytes) -> None:
    """What every compute call (Prefill, Step, ComputeKV, Repair, Tick) must name."""
    check_session(session_id, version)
    check_digest(digest)
