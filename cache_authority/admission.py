"""Admission: what a request may carry and how many streams a client may hold open, checked
before anything reaches the engine.

The limits are stated in the protos (cache_authority.proto, session.proto) and live in
positronic/limits.py. Over a count or size limit is RESOURCE_EXHAUSTED; a malformed field is
INVALID_ARGUMENT. Every message quotes client input through `clip`.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cache_authority.ops import PatchError, Status
from positronic import limits
from positronic.v1 import cache_authority_pb2 as ca
from positronic.v1 import session_pb2


def _invalid(message: str) -> PatchError:
    return PatchError(Status.INVALID_ARGUMENT, message)


def check_session_id(session_id: str, *, allow_empty: bool = False) -> None:
    if allow_empty and not session_id:
        return
    problem = limits.check_session_id(session_id)
    if problem:
        raise _invalid(problem)


def check_patch_header(msg: ca.PatchRequest) -> None:
    """The first message of a Patch stream: a well-formed session id and request id."""
    if not msg.session_id:
        raise _invalid("the first Patch message must name the session")
    check_session_id(msg.session_id)
    problem = limits.check_request_id(msg.request_id)
    if problem:
        raise _invalid(problem)
    if msg.expected_version < 0:
        raise _invalid(f"expected_version {msg.expected_version} must not be negative")


def _check_text(value: str, limit: int, what: str) -> None:
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise PatchError(Status.RESOURCE_EXHAUSTED, f"{what}: {size} bytes, over {limit}")


def check_op_fields(ops: Sequence[session_pb2.PatchOp], first_index: int = 0) -> None:
    """The text fields of ops within their stated sizes (tensors and positions are the
    engine's to check against the session)."""
    for i, op in enumerate(ops, start=first_index):
        kind = op.WhichOneof("op")
        if kind == "append":
            for piece in op.append.pieces:
                _check_text(piece, limits.MAX_PIECE_BYTES, f"op {i} (append) piece")
        elif kind == "replace_pair":
            r = op.replace_pair
            _check_text(r.piece, limits.MAX_PIECE_BYTES, f"op {i} (replace_pair) piece")
            _check_text(
                r.replaced_text, limits.MAX_REPLACED_TEXT_BYTES, f"op {i} (replace_pair) text"
            )


def check_geometry_fields(g: session_pb2.ModelGeometry) -> None:
    """The strings and the scaling map of a geometry within their stated sizes."""
    _check_text(g.model_fingerprint, limits.MAX_NAME_BYTES, "geometry.model_fingerprint")
    _check_text(g.rope.rope_type, limits.MAX_NAME_BYTES, "geometry.rope.rope_type")
    if len(g.rope.scaling) > limits.MAX_SCALING_ENTRIES:
        raise PatchError(
            Status.RESOURCE_EXHAUSTED,
            f"geometry.rope.scaling has {len(g.rope.scaling)} entries, over "
            f"{limits.MAX_SCALING_ENTRIES}",
        )
    for key in g.rope.scaling:
        _check_text(key, limits.MAX_NAME_BYTES, "geometry.rope.scaling key")


def max_ops(hard_max_rows: int) -> int:
    """The most ops a valid patch can hold: every held row touched once (ReplacePair, Evict),
    every appended row its own Append, and one SetBrightness."""
    return 2 * hard_max_rows + 1


def peer_host(peer: str) -> str:
    """The client's address without its port ("ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7"), so that
    every connection of one client counts against one budget."""
    kind, sep, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and sep:
        host, _, _ = rest.rpartition(":")
        return f"{kind}:{host}"
    return peer


@dataclass(frozen=True)
class StreamLimits:
    """Open streams (Patch, Sync, Watch) allowed at once."""

    per_peer: int = 1024  # per client address (behind a proxy, every client shares one)
    per_session: int = 64  # streams that name one session
    total: int = 16384
    # Watches of every session: each costs a message per commit of any session, so their count
    # bounds the authority's work per Patch (1,000 of them cost ~120 ms of CPU per commit).
    every_session: int = 64

    def __post_init__(self) -> None:
        if min(self.per_peer, self.per_session, self.total, self.every_session) <= 0:
            raise ValueError("stream limits must be positive")


class StreamTicket:
    """One open stream's place in the table; `join` counts it against a session as well."""

    def __init__(self, table: StreamTable, peer: str):
        self._table, self.peer = table, peer
        self.session_id: str | None = None

    def join(self, session_id: str) -> None:
        self._table._join(self, session_id)


class StreamTable:
    """Counts open streams per client address, per session and in all; refuses one more with
    RESOURCE_EXHAUSTED. Thread-safe (streams open on the event loop; DirectStub calls too)."""

    def __init__(self, stream_limits: StreamLimits | None = None):
        self.limits = stream_limits or StreamLimits()
        self._lock = threading.Lock()
        self._peers: Counter[str] = Counter()
        self._sessions: Counter[str] = Counter()
        self._total = 0
        self._every_session = 0

    @contextlib.contextmanager
    def open(
        self, peer: str, session_id: str = "", *, every_session: bool = False
    ) -> Iterator[StreamTicket]:
        """Count one stream; `every_session`: a Watch of all sessions (its own, lower limit)."""
        host = peer_host(peer)
        with self._lock:
            if self._total >= self.limits.total:
                raise PatchError(
                    Status.RESOURCE_EXHAUSTED,
                    f"the authority holds {self._total} open streams, its limit; retry later",
                )
            if every_session and self._every_session >= self.limits.every_session:
                raise PatchError(
                    Status.RESOURCE_EXHAUSTED,
                    f"the authority holds {self._every_session} Watches of every session, its "
                    "limit (--max-all-session-watches); watch one session instead, or retry later",
                )
            if self._peers[host] >= self.limits.per_peer:
                raise PatchError(
                    Status.RESOURCE_EXHAUSTED,
                    f"client {limits.clip(host)} holds {self._peers[host]} open streams, the "
                    "limit per client; close some (or raise --max-streams-per-client)",
                )
            self._peers[host] += 1
            self._total += 1
            self._every_session += every_session
        ticket = StreamTicket(self, host)
        try:
            if session_id:
                ticket.join(session_id)
            yield ticket
        finally:
            with self._lock:
                self._peers[host] -= 1
                if not self._peers[host]:
                    del self._peers[host]
                self._total -= 1
                self._every_session -= every_session
                sid = ticket.session_id
                if sid is not None:
                    self._sessions[sid] -= 1
                    if not self._sessions[sid]:
                        del self._sessions[sid]

    def _join(self, ticket: StreamTicket, session_id: str) -> None:
        with self._lock:
            if ticket.session_id is not None:
                return
            if self._sessions[session_id] >= self.limits.per_session:
                raise PatchError(
                    Status.RESOURCE_EXHAUSTED,
                    f"session {limits.clip(session_id)} has {self._sessions[session_id]} open "
                    "streams, the limit per session (--max-streams-per-session)",
                )
            self._sessions[session_id] += 1
            ticket.session_id = session_id

    def open_count(self) -> int:
        with self._lock:
            return self._total
