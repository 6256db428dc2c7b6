"""The special-token policy: the one module that decides which structural tokens enter a session.

The user's rule (reference conversation, the 862 -> 863 surprise): no process may add tokens that
nobody asked for. So every tokenizer call in the project goes through `encode_text`, which passes
`add_special_tokens=False`, and structural tokens are added here, on purpose, and reported as
structural so the mirror can record them:

- BOS at the start of a session, by default (Llama checkpoints are trained with it);
- EOS never, unless the caller asks for it;
- no padding, ever (single-sequence sessions).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecialTokenPolicy:
    """Which structural tokens a prompt gets."""

    bos_at_session_start: bool = True
    eos_at_end: bool = False


@dataclass(frozen=True)
class Encoded:
    """Token ids exactly as they would enter the cache, with their pieces and provenance."""

    ids: list[int]
    pieces: list[str]
    structural: list[bool]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def text_ids(self) -> list[int]:
        return [i for i, s in zip(self.ids, self.structural, strict=True) if not s]


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` alone: never a BOS, EOS or pad the caller did not ask for."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The sentencepiece piece of each id (e.g. '▁Once'), for people to read."""
    return [str(p) for p in tokenizer.convert_ids_to_tokens(list(ids))]


def special_id(tokenizer, name: str) -> int | None:
    value = getattr(tokenizer, f"{name}_token_id", None)
    return int(value) if value is not None else None


def encode_prompt(
    tokenizer, text: str, policy: SpecialTokenPolicy | None = None, *, session_start: bool = True
) -> Encoded:
    """Prompt ids for a session: the text's own tokens plus exactly the structural tokens the
    policy names (BOS first at a session start; EOS last only if asked)."""
    policy = policy or SpecialTokenPolicy()
    ids = encode_text(tokenizer, text)
    structural = [False] * len(ids)
    if session_start and policy.bos_at_session_start:
        bos = special_id(tokenizer, "bos")
        if bos is None:
            raise ValueError("the policy asks for BOS but the tokenizer has no bos_token_id")
        ids = [bos, *ids]
        structural = [True, *structural]
    if policy.eos_at_end:
        eos = special_id(tokenizer, "eos")
        if eos is None:
            raise ValueError("the policy asks for EOS but the tokenizer has no eos_token_id")
        ids = [*ids, eos]
        structural = [*structural, True]
    return Encoded(ids=ids, pieces=token_pieces(tokenizer, ids), structural=structural)


def decode_pieces(tokenizer, ids: list[int], context: list[int] | None = None) -> list[str]:
    """The text each id adds when decoded after `context` (word-start spaces kept).

    Decoding single ids drops their leading space, so each piece is the difference between
    decoding the sequence with and without it.
    """
    context = list(context or [])
    pieces = []
    prev = tokenizer.decode(context, skip_special_tokens=False) if context else ""
    seq = list(context)
    for i in ids:
        seq.append(int(i))
        text = tokenizer.decode(seq, skip_special_tokens=False)
        pieces.append(text[len(prev) :] if text.startswith(prev) else text)
        prev = text
    return pieces
