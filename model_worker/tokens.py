"""Tokenize / Detokenize through the special-token policy (positronic.special_tokens)."""

from __future__ import annotations

from collections.abc import Sequence

from model_worker.errors import invalid
from model_worker.model import LoadedModel
from positronic.special_tokens import Encoded, SpecialTokenPolicy, decode_pieces, encode_prompt


def tokenize(lm: LoadedModel, text: str, add_bos: bool) -> Encoded:
    """Exactly the ids that would enter the cache: the text's own, plus BOS first if asked."""
    policy = SpecialTokenPolicy(bos_at_session_start=add_bos, eos_at_end=False)
    try:
        return encode_prompt(lm.tokenizer, text, policy, session_start=True)
    except ValueError as e:  # BOS asked of a tokenizer that has none
        raise invalid(str(e)) from None


def detokenize(
    lm: LoadedModel, ids: Sequence[int], skip_special_tokens: bool
) -> tuple[str, list[str]]:
    """(text, the text each id adds in context); skipped special ids add ''."""
    size = len(lm.tokenizer)  # type: ignore[arg-type]
    for i, t in enumerate(ids):
        if not 0 <= t < size:
            raise invalid(f"id {i} ({t}) outside the tokenizer's vocabulary [0, {size})")
    special = lm.special.all
    kept = [t for t in ids if not (skip_special_tokens and t in special)]
    kept_pieces = iter(decode_pieces(lm.tokenizer, kept))
    pieces = ["" if skip_special_tokens and t in special else next(kept_pieces) for t in ids]
    text = lm.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)  # type: ignore[attr-defined]
    return text, pieces
