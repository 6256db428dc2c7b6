"""The limits the protos state (cache_authority.proto, session.proto), in one place for the
authority that enforces them and the clients that want to stay inside them.

Pure code: no grpc, no torch. `clip` is how every error message quotes client input, so that a
hostile 20 KB id never travels back in a status (whose message rides in HTTP/2 trailers, and
over the metadata limit turns a NOT_FOUND into RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import re

# A session id names a folder on disk and appears in logs and metric labels.
SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A request id is the client's idempotency key within one session.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Brightness (and any policy score kept in the mirror) lies in [0, MAX_BRIGHTNESS]: Halo Weave
# uses [0, 255]; H2O's accumulated attention grows by at most 1 per tick, so it stays under 1e9
# for the first billion tokens of a stream.
MAX_BRIGHTNESS = 1e9
# Text fields of an op: a token's decoded piece, and what a merged row replaced.
MAX_PIECE_BYTES = 1024
MAX_REPLACED_TEXT_BYTES = 64 * 1024
# Model identity strings in a geometry (fingerprint, rope_type) and its scaling map.
MAX_NAME_BYTES = 256
MAX_SCALING_ENTRIES = 32
# How much of a client's string an error message quotes.
ECHO_CHARS = 64
# The longest status message the authority sends (a guard behind the quoting above).
MAX_STATUS_MESSAGE_CHARS = 1024


def clip(value: object, limit: int = ECHO_CHARS) -> str:
    """repr() of a client-supplied value, cut to `limit` characters plus '...' and its length."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    return f"{text[:limit]}... ({size} chars)"


def clip_message(message: str) -> str:
    """A status message no longer than MAX_STATUS_MESSAGE_CHARS."""
    if len(message) <= MAX_STATUS_MESSAGE_CHARS:
        return message
    return message[: MAX_STATUS_MESSAGE_CHARS - 3] + "..."


def check_session_id(session_id: str) -> str | None:
    """None when `session_id` is well formed, else why not (input quoted by clip)."""
    if SESSION_ID.fullmatch(session_id):
        return None
    return (
        f"session id {clip(session_id)} must be 1-128 chars of [A-Za-z0-9._-], first alphanumeric"
    )


def check_request_id(request_id: str) -> str | None:
    """None when `request_id` is empty (no idempotency) or well formed, else why not."""
    if not request_id or REQUEST_ID.fullmatch(request_id):
        return None
    return f"request id {clip(request_id)} must be 1-128 chars of [A-Za-z0-9._:-] (or empty)"
