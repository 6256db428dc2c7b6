"""What a browser is sent about one session: its mirror as text rows, each shaded by its
brightness, and the marks of what changed since the previous snapshot (merged rows just made,
rows evicted).

Pure code: a GetSessionResponse in, plain JSON-ready dicts out; no grpc, no asyncio.

Text. Every `MirrorEntry.piece` is a vocabulary piece (session.proto): "▁" stands for a space,
and "<0xNN>" byte pieces spell one UTF-8 byte each, so a character outside the vocabulary spans
several rows. The bytes of a run of byte rows are decoded together and each character is given
to the row that completes it (the rows before it show as empty slivers; an unfinished
character becomes U+FFFD). Structural rows show their piece as is ("<s>"). This is the text the
pieces spell; the exact text of ids is the worker's (Detokenize), and the view talks only to the
authority.

Shade. Policies keep brightness on different scales (halo: [0, 255]; h2o: accumulated attention,
growing; tova: the newest attention row), so each snapshot is normalised on its own:
shade = (b - lo) / (hi - lo) with lo, hi the snapshot's smallest and largest brightness; when
they are equal (a fresh session, or a policy that keeps no scores, like streaming) every row
gets the neutral 0.5. The page turns shade 0 into no tint and 1 into full amber.

Merged rows. `MirrorEntry.replaced_text` says what a merged row stands for (all the text it
replaced, through earlier merges). Where it is empty, the page shows the merged row's direct
parents from `replaced_token_ids`, each as the piece of that id as the view has seen it in some
row (a PieceBook: token id -> piece, learned from every snapshot, bounded).

Marks. Between two snapshots (several commits apart when refreshes coalesce) a row that is gone
was either merged (a row created since then names it in `replaced_ledger_ids`) or evicted. A
chain of merges within one interval hides the older ancestors (a merged row names only its two
direct parents), so the Watch counts of the interval decide: no evictions in it, no eviction
marks; otherwise the unexplained rows, at most as many as were evicted, are marked evicted.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from positronic.v1 import cache_authority_pb2 as ca
from positronic.v1 import session_pb2

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
WORD_START = "▁"
# What one row may add to a page: a merged row's replaced_text can be 64 KiB, and a session
# thousands of such rows, so the page gets a prefix (the hover says it was cut).
SHOWN_REPLACED_CHARS = 256
SHOWN_REPLACED_IDS = 16

SOURCES = {
    session_pb2.TOKEN_SOURCE_STRUCTURAL: "structural",
    session_pb2.TOKEN_SOURCE_PROMPT: "prompt",
    session_pb2.TOKEN_SOURCE_GENERATED: "generated",
    session_pb2.TOKEN_SOURCE_MERGED: "merged",
}


def piece_texts(pieces: Sequence[str], structural: Sequence[bool] | None = None) -> list[str]:
    """The text each row adds (see the module docstring); structural rows keep their piece."""
    structural = structural or [False] * len(pieces)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    texts: list[str] = []
    in_bytes = False  # the previous row was a byte piece
    for piece, is_structural in zip(pieces, structural, strict=True):
        match = None if is_structural else BYTE_PIECE.fullmatch(piece)
        if match:
            texts.append(decoder.decode(bytes([int(match.group(1), 16)])))
            in_bytes = True
            continue
        if in_bytes:  # an unfinished character before this row: its last byte row shows U+FFFD
            texts[-1] += decoder.decode(b"", final=True)
            decoder.reset()
            in_bytes = False
        texts.append(piece if is_structural else piece.replace(WORD_START, " "))
    if in_bytes:
        texts[-1] += decoder.decode(b"", final=True)
    return texts


def clip_text(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters and an ellipsis."""
    return text if len(text) <= limit else text[:limit] + "…"


def shades(brightness: Sequence[float]) -> tuple[list[float], float, float]:
    """(shade in [0, 1] per row, lo, hi): brightness normalised by this snapshot's range."""
    if not brightness:
        return [], 0.0, 0.0
    lo, hi = min(brightness), max(brightness)
    if hi <= lo:  # no spread, no information: a neutral shade
        return [0.5] * len(brightness), lo, hi
    return [round((b - lo) / (hi - lo), 3) for b in brightness], lo, hi


class PieceBook:
    """Token id -> vocabulary piece, learned from the rows seen (the view has no tokenizer)."""

    def __init__(self, capacity: int = 1 << 16):
        self._pieces: dict[int, str] = {}
        self._capacity = capacity

    def learn(self, mirror: Sequence[session_pb2.MirrorEntry]) -> None:
        for m in mirror:
            if m.piece and (m.token_id in self._pieces or len(self._pieces) < self._capacity):
                self._pieces[m.token_id] = m.piece

    def text(self, token_id: int) -> str | None:
        """The piece of `token_id` as text ("▁" a space, byte pieces as they are); None when
        no row with this id was seen."""
        piece = self._pieces.get(token_id)
        return None if piece is None else piece.replace(WORD_START, " ")


@dataclass(frozen=True)
class Snapshot:
    """One rendered GetSession: what the next snapshot is compared with."""

    version: int
    created_unix_ns: int
    rows: list[dict]
    ledger_ids: tuple[int, ...]
    texts: dict[int, str] = field(repr=False)  # ledger id -> text
    lo: float = 0.0
    hi: float = 0.0


@dataclass(frozen=True)
class Marks:
    """What happened between two snapshots."""

    merges: list[dict]  # {"version", "ledger", "text", "replaced_text", "replaced_ids", ...}
    evictions: list[dict]  # {"text", "before": ledger id of the next surviving row, or None}


def render(resp: ca.GetSessionResponse, book: PieceBook | None = None) -> Snapshot:
    """A session's mirror as rows for the page, in row order; `book` learns its pieces and
    names the parents of merged rows."""
    mirror = resp.mirror
    book = book or PieceBook()
    book.learn(mirror)
    structural = [m.source == session_pb2.TOKEN_SOURCE_STRUCTURAL for m in mirror]
    texts = piece_texts([m.piece for m in mirror], structural)
    shade, lo, hi = shades([m.brightness for m in mirror])
    rows = []
    for m, text, s in zip(mirror, texts, shade, strict=True):
        row = {
            "ledger": m.ledger_id,
            "text": text,
            "piece": m.piece,
            "token": m.token_id,
            "brightness": round(m.brightness, 3),
            "shade": s,
            "source": SOURCES.get(m.source, "unspecified"),
        }
        if m.source == session_pb2.TOKEN_SOURCE_MERGED or m.replaced_ledger_ids:
            ids = list(m.replaced_token_ids[:SHOWN_REPLACED_IDS])
            row["replaced_text"] = clip_text(m.replaced_text, SHOWN_REPLACED_CHARS)
            row["replaced_ids"] = ids
            row["replaced_pieces"] = [book.text(t) for t in ids]
            row["merged_at"] = m.created_version
        rows.append(row)
    return Snapshot(
        version=resp.session.version,
        created_unix_ns=resp.session.created_unix_ns,
        rows=rows,
        ledger_ids=tuple(m.ledger_id for m in mirror),
        texts={m.ledger_id: t for m, t in zip(mirror, texts, strict=True)},
        lo=lo,
        hi=hi,
    )


def diff(
    prev: Snapshot | None, cur: Snapshot, mirror: Sequence[session_pb2.MirrorEntry], evicted: int
) -> Marks:
    """Merges and evictions from `prev` to `cur`; `evicted` is how many rows the Watch counts
    say were evicted in between (-1: unknown, then every unexplained row is marked)."""
    if prev is None or prev.created_unix_ns != cur.created_unix_ns or prev.version > cur.version:
        return Marks([], [])  # first sight, or another session under the same id
    merges = []
    replaced: set[int] = set()
    for m, row in zip(mirror, cur.rows, strict=True):
        if m.created_version > prev.version and m.replaced_ledger_ids:
            replaced.update(m.replaced_ledger_ids)
            merges.append(
                {
                    "version": m.created_version,
                    "ledger": m.ledger_id,
                    "text": row["text"],
                    "replaced_text": row["replaced_text"],
                    "replaced_ids": row["replaced_ids"],
                    "replaced_pieces": row["replaced_pieces"],
                }
            )
    alive = set(cur.ledger_ids)
    evictions: list[dict] = []
    if evicted != 0:
        for i, ledger in enumerate(prev.ledger_ids):
            if ledger in alive or ledger in replaced:
                continue
            after = (x for x in prev.ledger_ids[i + 1 :] if x in alive)
            evictions.append({"text": prev.texts.get(ledger, ""), "before": next(after, None)})
        if evicted > 0:
            evictions = evictions[:evicted]
    return Marks(sorted(merges, key=lambda m: m["version"]), evictions)
