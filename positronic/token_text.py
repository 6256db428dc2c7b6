"""What each token id is as text: its vocabulary piece and the exact UTF-8 bytes it adds.

`TokenTable.from_tokenizer` builds, once per loaded tokenizer, for every id:

- `pieces[id]`: the vocabulary piece ("▁Once", "<0xF0>", "<s>"), the one meaning of `piece` in
  every message (mirror entries, appends, Tokenize, Detokenize);
- `text_bytes[id]`: the UTF-8 bytes the id adds to a text (a byte-fallback token adds one byte,
  possibly part of a character). By the tokenizer's decoder:
  sentencepiece-style (`▁` replaced by a space, or Metaspace): the piece with `▁` as a space, and
  with byte fallback `<0xNN>` as that byte; byte-level BPE (GPT-2, Llama 3): each character of
  the piece mapped back to its byte (GPT-2's byte-to-unicode table, inverted); WordPiece: `##x`
  continues a word ("x"), any other piece starts one (" x"); special tokens: nothing (they are
  not text); anything else: the tokenizer's own decode, after a fixed ordinary token.

Text of a sequence = its bytes joined and decoded. The one difference from `tokenizer.decode`
(skipping special tokens): decoders that strip the first token's word-start space (Llama's
`Strip`, Metaspace) drop it from the front of a whole text (decode(▁Once ▁upon) = "Once upon");
the table keeps it (" Once upon"), because in a stream that space is text.

`Utf8Assembler` turns a stream of such bytes into text incrementally: a character split over
byte tokens comes out once it is complete; invalid bytes become U+FFFD, one per maximal invalid
sequence (Python's UTF-8 decoder; Hugging Face's ByteFallback writes one per byte).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Utf8Assembler:
    """Bytes in, complete text out; a partial character is held until its last byte arrives."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        """The end of the stream: a character still incomplete becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)


@dataclass(frozen=True)
class TokenTable:
    """Vocabulary piece and text bytes of every id of one tokenizer (ids 0 .. len - 1)."""

    pieces: tuple[str, ...]
    text_bytes: tuple[bytes, ...]
    special: frozenset[int]
    strips_leading_space: bool  # tokenizer.decode drops the first token's word-start space

    def __len__(self) -> int:
        return len(self.pieces)

    def bytes_of(self, ids: Iterable[int]) -> bytes:
        table = self.text_bytes
        return b"".join(table[i] for i in ids)

    def text_of(self, ids: Iterable[int]) -> str:
        """The text of a sequence (special tokens add nothing)."""
        return self.bytes_of(ids).decode("utf-8", errors="replace")

    def texts(self, ids: Sequence[int]) -> list[str]:
        """The text each id adds, joining to text_of(ids): a character made of several byte
        tokens belongs to the id that completes it."""
        return stream_texts([self.text_bytes[i] for i in ids])

    @classmethod
    def from_tokenizer(cls, tokenizer) -> TokenTable:
        n = len(tokenizer)
        pieces = [str(p) for p in tokenizer.convert_ids_to_tokens(list(range(n)))]
        added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        special = {int(i) for i in getattr(tokenizer, "all_special_ids", ()) or ()}
        special |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
        steps = _decoder_steps(tokenizer)
        kinds = {s.get("type") for s in steps}
        to_bytes = _piece_rule(steps, kinds) or _decode_rule(tokenizer, special, n)
        table = []
        for i, piece in enumerate(pieces):
            if i in special:
                table.append(b"")
            elif i in added:  # an added ordinary token is its literal content
                table.append(str(added[i].content).encode("utf-8"))
            else:
                table.append(to_bytes(i, piece))
        strips = any(
            s.get("type") == "Strip" and s.get("content") == " " and s.get("start", 0) > 0
            for s in steps
        ) or any(s.get("type") == "Metaspace" and s.get("prepend_scheme") != "never" for s in steps)
        return cls(tuple(pieces), tuple(table), frozenset(special), strips)


def stream_texts(chunks: Iterable[bytes]) -> list[str]:
    """The text each chunk of a byte stream completes; the end of the stream flushes into the
    last one."""
    assembler = Utf8Assembler()
    out = [assembler.push(b) for b in chunks]
    tail = assembler.flush()
    if tail:  # only after at least one chunk
        out[-1] += tail
    return out


def _decoder_steps(tokenizer) -> list[dict]:
    """The steps of the tokenizer's decoder (tokenizers' JSON form); [] when it has none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return []
    state = json.loads(decoder.__getstate__())
    return list(state.get("decoders", [])) if state.get("type") == "Sequence" else [state]


def _piece_rule(steps: list[dict], kinds: set):
    """A function (id, piece) -> bytes for the decoders read piece by piece, else None."""
    if "ByteLevel" in kinds:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_of = {c: b for b, c in bytes_to_unicode().items()}

        def byte_level(_: int, piece: str) -> bytes:
            if all(c in byte_of for c in piece):
                return bytes(byte_of[c] for c in piece)
            return piece.encode("utf-8")

        return byte_level
    space = None
    for s in steps:
        if s.get("type") == "Replace" and s.get("content") == " ":
            space = s.get("pattern", {}).get("String")
        elif s.get("type") == "Metaspace":
            space = s.get("replacement", "▁")
    if space:
        byte_fallback = "ByteFallback" in kinds

        def metaspace(_: int, piece: str) -> bytes:
            m = _BYTE_PIECE.fullmatch(piece) if byte_fallback else None
            if m:
                return bytes([int(m.group(1), 16)])
            return piece.replace(space, " ").encode("utf-8")

        return metaspace
    prefix = next((s.get("prefix", "##") for s in steps if s.get("type") == "WordPiece"), None)
    if prefix:

        def wordpiece(_: int, piece: str) -> bytes:
            if piece.startswith(prefix):
                return piece[len(prefix) :].encode("utf-8")
            return (" " + piece).encode("utf-8")

        return wordpiece
    return None


def _decode_rule(tokenizer, special: set[int], n: int):
    """(id, piece) -> bytes by the tokenizer's own decode after a fixed ordinary token, which
    keeps the word-start space a lone decode drops."""

    def decode(ids: list[int]) -> str:
        return str(
            tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        )

    anchor = next((i for i in range(n) if i not in special and decode([i])), None)
    base = decode([anchor]) if anchor is not None else ""

    def in_context(i: int, _: str) -> bytes:
        if anchor is None:
            return decode([i]).encode("utf-8")
        text = decode([anchor, i])
        return (text[len(base) :] if text.startswith(base) else decode([i])).encode("utf-8")

    return in_context
