"""Limits on every request field of the ModelWorker (stated in model_worker.proto), and the checks
every RPC shares: the session it names, the digest it must name.

A field over its limit is RESOURCE_EXHAUSTED; a malformed one INVALID_ARGUMENT. Messages quote
client strings through `positronic.limits.clip` (a bounded prefix), as the authority does.
"""

from __future__ import annotations

from collections.abc import Sized

from model_worker.errors import WorkerError, invalid
from positronic.limits import check_session_id

MAX_TEXT_BYTES = 1 << 20  # Tokenize: UTF-8 bytes of text
MAX_IDS = 1 << 16  # Detokenize ids, Prefill token_ids
MAX_INSERTIONS = 256  # ComputeKV insertions
MAX_PAIRS = 256  # Repair pairs
MAX_TOP_LOGPROBS = 100  # Step top_logprobs
MAX_CANDIDATES = 100  # Repair max_candidates
DIGEST_BYTES = 32  # sha256, as the authority's digest chain
# lm / mlm repair: tokens scored in one call, summed over its pairs. Each pair scores its own two
# tokens and a pool of max(REPAIR_POOL, max_candidates) likely ones. The limit lets every pair
# count up to MAX_PAIRS use the pool (what the loop asks for), and makes a larger max_candidates
# cost pairs: 85 at 100. Without it 239 pairs at 100 candidates (24,378 tokens) cost ~50 s of
# worker CPU on the 260K demo model (found by an outside attack).
REPAIR_POOL = 32
MAX_SCORED_CANDIDATES = MAX_PAIRS * (REPAIR_POOL + 2)  # 8,704


def over(what: str, count: int, limit: int) -> WorkerError:
    return WorkerError("RESOURCE_EXHAUSTED", f"{what}: {count} is over the limit of {limit}")


def check_count(what: str, items: Sized, limit: int) -> None:
    if len(items) > limit:
        raise over(what, len(items), limit)


def check_repair_work(pairs: int, max_candidates: int) -> None:
    """RESOURCE_EXHAUSTED when an lm / mlm repair of `pairs` pairs would score more than
    MAX_SCORED_CANDIDATES tokens (pairs and candidates are each within their own limits)."""
    scored = pairs * (max(REPAIR_POOL, max_candidates) + 2)
    if scored > MAX_SCORED_CANDIDATES:
        raise WorkerError(
            "RESOURCE_EXHAUSTED",
            f"{pairs} pairs at {max_candidates} candidates score {scored} tokens, over the limit "
            f"of {MAX_SCORED_CANDIDATES} per call; ask for fewer pairs or candidates",
        )


def check_session(session_id: str, version: int) -> None:
    why = check_session_id(session_id)  # the authority's rule
    if why:
        raise invalid(why)
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
