"""Tokenize / Detokenize through the special-token policy and the token table.

Tokenize: the text's own ids (never a special id; positronic.special_tokens) plus BOS if asked.
Detokenize: linear in the ids, from the table built once at load (positronic.token_text): each
id's vocabulary piece, the bytes it adds, and the text it adds (a character split over byte
tokens belongs to the id that completes it), joining to the whole text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model_worker.errors import invalid
from model_worker.limits import MAX_IDS, MAX_TEXT_BYTES, check_count, over
from model_worker.model import LoadedModel
from positronic.special_tokens import Encoded, SpecialTokenPolicy, encode_prompt
from positronic.token_text import stream_texts


@dataclass(frozen=True)
class Detokenized:
    text: str
    pieces: list[str]  # vocabulary pieces
    piece_bytes: list[bytes]  # the bytes each id adds
    piece_texts: list[str]  # the text each id adds; they join to `text`


def tokenize(lm: LoadedModel, text: str, add_bos: bool) -> Encoded:
    """Exactly the ids that would enter the cache: the text's own, plus BOS first if asked."""
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise over("text bytes", size, MAX_TEXT_BYTES)
    policy = SpecialTokenPolicy(bos_at_session_start=add_bos, eos_at_end=False)
    try:
        return encode_prompt(lm.encoder, text, policy, session_start=True)
    except ValueError as e:  # BOS asked of a tokenizer that has none, text it cannot spell
        raise invalid(str(e)) from None


def detokenize(lm: LoadedModel, ids: Sequence[int], skip_special_tokens: bool) -> Detokenized:
    """Special tokens add their piece ("<s>") to the text, or nothing when skipped. Ids of the
    model's vocabulary past the tokenizer's (padding rows a model may still sample) have no
    piece and add nothing."""
    check_count("ids", ids, MAX_IDS)
    table = lm.table
    size = max(len(table), lm.vocab_size)
    for i, t in enumerate(ids):
        if not 0 <= t < size:
            raise invalid(f"id {i} ({t}) outside the vocabulary [0, {size})")
    shown = frozenset() if skip_special_tokens else table.special
    pieces = [table.pieces[t] if t < len(table) else "" for t in ids]
    chunks = [
        piece.encode() if t in shown else table.text_bytes[t] if t < len(table) else b""
        for t, piece in zip(ids, pieces, strict=True)
    ]
    texts = stream_texts(chunks)
    return Detokenized(text="".join(texts), pieces=pieces, piece_bytes=chunks, piece_texts=texts)
