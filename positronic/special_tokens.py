"""The special-token policy: the one module that decides which structural tokens enter a session.

The user's rule (reference conversation, the 862 -> 863 surprise): no process may add tokens that
nobody asked for. So every tokenizer call in the project goes through `encode_text` (a
`TextEncoder`), and structural tokens are added here, on purpose, and reported as structural so
the mirror can record them:

- BOS at the start of a session, by default (Llama checkpoints are trained with it);
- EOS never, unless the caller asks for it;
- no padding, ever (single-sequence sessions).

Text is only ever text: a prompt that spells a special token ("a<s>b", "</s>", "<unk>") gets
the ids of those characters, as sentencepiece gives them, never the special id (with
`add_special_tokens=False` alone, Hugging Face tokenizers still match "<s>" to BOS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SpecialTokenPolicy:
    """Which structural tokens a prompt gets."""

    bos_at_session_start: bool = True
    eos_at_end: bool = False


@dataclass(frozen=True)
class Encoded:
    """Token ids exactly as they would enter the cache, with their pieces and provenance."""

    ids: list[int]
    pieces: list[str]  # vocabulary pieces ("▁Once", "<0xF0>", "<s>")
    structural: list[bool]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def text_ids(self) -> list[int]:
        return [i for i, s in zip(self.ids, self.structural, strict=True) if not s]


class TextEncoder:
    """Text -> ids for one tokenizer, never a special id. Build it once per loaded tokenizer.

    A sentencepiece tokenizer (a `tokenizer.model` beside it whose pieces are the tokenizer's
    own, as for Llama 2 and TinyLlama) encodes with sentencepiece itself, which the model was
    trained with: Hugging Face's pipeline for the same vocabulary splits whitespace runs and
    text that starts with a space differently ("  a  b": sentencepiece ▁▁ ▁a ▁ ▁b, HF ▁▁ a ▁▁ b)
    and matches special-token strings. sentencepiece treats control symbols (<s>, </s>) and
    <unk> in text as characters. Any other tokenizer is called with `split_special_tokens=True`
    (special-token strings split as text) and `add_special_tokens=False`; where its model still
    spells a word as a special token (a word-level vocabulary holding "<s>"), that word is
    unknown text: <unk>, or a ValueError when the tokenizer has no unk token.
    """

    def __init__(self, tokenizer, *, use_sentencepiece: bool = True):
        self.tokenizer = tokenizer
        self._sp = _sentencepiece_of(tokenizer) if use_sentencepiece else None
        self._unk = special_id(tokenizer, "unk")
        added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        special = {int(i) for i in getattr(tokenizer, "all_special_ids", ()) or ()}
        special |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
        self._structural = frozenset(special - {self._unk})

    @property
    def uses_sentencepiece(self) -> bool:
        return self._sp is not None

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            ids = [int(i) for i in self._sp.encode(text)]
        else:
            out = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)
            ids = [int(i) for i in out["input_ids"]]
        if self._structural.isdisjoint(ids):
            return ids
        if self._unk is None:
            raise ValueError("the text spells a special token this tokenizer has no text for")
        return [self._unk if i in self._structural else i for i in ids]

    def pieces(self, ids: list[int]) -> list[str]:
        """The vocabulary piece of each id (e.g. '▁Once', '<0xF0>'), for people to read."""
        return [str(p) for p in self.tokenizer.convert_ids_to_tokens(list(ids))]


def _sentencepiece_of(tokenizer):
    """The tokenizer's sentencepiece model, when it has one with exactly its vocabulary."""
    path = getattr(tokenizer, "vocab_file", None)
    if not path or not str(path).endswith(".model") or not Path(path).is_file():
        return None
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError):
        return None
    n = sp.get_piece_size()
    if n > len(tokenizer):
        return None
    hf = tokenizer.convert_ids_to_tokens(list(range(n)))
    if any(sp.id_to_piece(i) != hf[i] for i in range(n)):
        return None  # tokenizer.json was edited: its ids do not mean sentencepiece's pieces
    return sp


def text_encoder(tokenizer) -> TextEncoder:
    """`tokenizer` itself when it is a TextEncoder, else a new one for it."""
    return tokenizer if isinstance(tokenizer, TextEncoder) else TextEncoder(tokenizer)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` alone: never a BOS, EOS, pad or any special id. `tokenizer` is a
    TextEncoder (keep one when encoding more than once) or a tokenizer."""
    return text_encoder(tokenizer).encode(text)


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The vocabulary piece of each id (e.g. '▁Once'), for people to read."""
    if isinstance(tokenizer, TextEncoder):
        return tokenizer.pieces(ids)
    return [str(p) for p in tokenizer.convert_ids_to_tokens(list(ids))]


def special_id(tokenizer, name: str) -> int | None:
    if isinstance(tokenizer, TextEncoder):
        tokenizer = tokenizer.tokenizer
    value = getattr(tokenizer, f"{name}_token_id", None)
    return int(value) if value is not None else None


def encode_prompt(
    tokenizer, text: str, policy: SpecialTokenPolicy | None = None, *, session_start: bool = True
) -> Encoded:
    """Prompt ids for a session: the text's own tokens plus exactly the structural tokens the
    policy names (BOS first at a session start; EOS last only if asked)."""
    policy = policy or SpecialTokenPolicy()
    encoder = text_encoder(tokenizer)
    ids = encoder.encode(text)
    structural = [False] * len(ids)
    if session_start and policy.bos_at_session_start:
        bos = special_id(encoder, "bos")
        if bos is None:
            raise ValueError("the policy asks for BOS but the tokenizer has no bos_token_id")
        ids = [bos, *ids]
        structural = [True, *structural]
    if policy.eos_at_end:
        eos = special_id(encoder, "eos")
        if eos is None:
            raise ValueError("the policy asks for EOS but the tokenizer has no eos_token_id")
        ids = [*ids, eos]
        structural = [*structural, True]
    return Encoded(ids=ids, pieces=encoder.pieces(ids), structural=structural)
