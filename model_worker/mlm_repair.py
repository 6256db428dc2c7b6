"""The `mlm` repairer: the user's design, a masked LM reads the text around the pair.

For the pair (a, b) at rows (p, p + 1): the rows around it are turned into text (a window on
each side, exact bytes from the token table); a's text is replaced by the mask token and b's text
is left out; the masked LM predicts the masked word; each prediction is re-tokenized with the
causal model's tokenizer, without special tokens and after the left context (a word alone gets a
word-start marker it may not have in place), and kept only if it is exactly one causal token.
The mask is placed by id between the encoded left and right texts: text in the window that spells
a special token ("[MASK]", "[SEP]") stays text. Candidates keep the masked LM's order
and score (its log-probability). Real users point `--repair-model` at e.g.
`distilbert-base-uncased`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from model_worker.forward import Rows
from model_worker.model import LoadedModel, choose_device
from model_worker.repair import Candidate, banned_ids, candidate
from positronic.special_tokens import TextEncoder

logger = logging.getLogger(__name__)


@dataclass
class MaskedLM:
    name: str
    model: torch.nn.Module
    tokenizer: object
    encoder: TextEncoder = field(init=False)

    def __post_init__(self) -> None:
        if getattr(self.tokenizer, "mask_token_id", None) is None:
            raise ValueError(f"{self.name}: the tokenizer has no mask token")
        self.encoder = TextEncoder(self.tokenizer)
        self.model.eval()


def load_masked_lm(name: str, device: str = "auto") -> MaskedLM:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    dev = choose_device(device)
    logger.info("loading masked LM %s on %s", name, dev)
    model = AutoModelForMaskedLM.from_pretrained(name).to(dev)
    return MaskedLM(name, model, AutoTokenizer.from_pretrained(name))


@dataclass
class MLMRepairer:
    lm: LoadedModel
    mlm: MaskedLM
    window: int = 24  # rows of text on each side of the pair
    pool: int = 64  # masked-LM predictions examined
    name: str = "mlm"
    _banned: set[int] = field(init=False)

    def __post_init__(self) -> None:
        self._banned = banned_ids(self.lm)

    def masked_text(self, rows: Rows, p: int) -> tuple[str, str, str]:
        """(left text, the space the first token carried, right text) around the pair."""
        lo, hi = max(0, p - self.window), min(rows.count, p + 2 + self.window)

        def text(a: int, b: int) -> str:  # special and undecodable ids add nothing
            ids = [int(t) for t in rows.token_ids[a:b]]
            return self.lm.table.text_of(t for t in ids if t not in self._banned)

        first = text(p, p + 1)
        lead = first[: len(first) - len(first.lstrip())]
        return text(lo, p).lstrip(), lead, text(p + 2, hi)

    def masked_ids(self, left: str, right: str) -> tuple[list[int], int]:
        """The masked LM's input ids and the mask's index: CLS, left, the mask, right, SEP. The
        mask carries the masked token's word-start space (masked LMs' masks absorb it)."""
        tok = self.mlm.tokenizer
        mask = int(tok.mask_token_id)  # type: ignore[attr-defined]
        left_ids = self.mlm.encoder.encode(left) if left else []
        right_ids = self.mlm.encoder.encode(right) if right else []
        # Structural tokens the masked LM was trained with, added on purpose.
        cls, sep = getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None)
        head = [int(cls)] if cls is not None else []
        tail = [int(sep)] if sep is not None else []
        return [*head, *left_ids, mask, *right_ids, *tail], len(head) + len(left_ids)

    def predictions(self, left: str, lead: str, right: str) -> list[tuple[int, float]]:
        """Masked-LM (id, log-prob) for the masked word, best first, special tokens left out.
        (`lead`, the masked token's space, is the mask's own.)"""
        tok = self.mlm.tokenizer
        ids, mask_at = self.masked_ids(left, right)
        limit = int(getattr(self.mlm.model.config, "max_position_embeddings", 512))
        if len(ids) > limit:  # keep the mask near the middle
            start = min(max(0, mask_at - limit // 2), len(ids) - limit)
            ids, mask_at = ids[start : start + limit], mask_at - start
        dev = next(self.mlm.model.parameters()).device
        with torch.inference_mode():
            logits = self.mlm.model(input_ids=torch.tensor([ids], device=dev)).logits
        logp = logits[0, mask_at].float().log_softmax(dim=-1).cpu()
        special = list(getattr(tok, "all_special_ids", ()) or ())
        if special:
            logp[special] = float("-inf")
        n = min(self.pool, int(torch.isfinite(logp).sum()))
        values, order = torch.topk(logp, n)
        return list(zip(order.tolist(), values.tolist(), strict=True))

    def candidates(self, rows: Rows, position: int, max_candidates: int) -> list[Candidate]:
        left, lead, right = self.masked_text(rows, position)
        causal = self.lm.encoder
        left_ids = causal.encode(left) if left else []
        out: list[Candidate] = []
        seen: set[int] = set()
        for mlm_id, score in self.predictions(left, lead, right):
            word = self.mlm.tokenizer.decode([mlm_id]).strip()  # type: ignore[attr-defined]
            if not word or word.startswith("##"):  # a word-piece continuation is no word
                continue
            ids = causal.encode(f"{left}{lead}{word}")
            if ids[: len(left_ids)] != left_ids or len(ids) != len(left_ids) + 1:
                continue  # more than one causal token (or the boundary merged with the left)
            token = ids[-1]
            if token in self._banned or token in seen:
                continue
            seen.add(token)
            out.append(candidate(self.lm, token, score))
            if len(out) == max_candidates:
                break
        return out
