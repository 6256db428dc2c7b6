"""Tokenize / Detokenize as plain functions on a tiny model (model_worker/tokens.py)."""

from __future__ import annotations

import pytest
import torch
from worker_fixtures import word_tokenizer

from model_worker import tokens
from model_worker.errors import WorkerError
from model_worker.limits import MAX_IDS, MAX_TEXT_BYTES
from model_worker.model import describe


@pytest.fixture(scope="module")
def padded():
    """A tiny Llama whose embedding has 8 rows past its tokenizer's vocabulary, as models
    padded to a multiple of 64 have."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok) + 8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return describe("padded", LlamaForCausalLM(config), tok)


def test_ids_past_the_tokenizer_add_nothing_but_are_not_refused(padded):
    n = len(padded.tokenizer)
    out = tokens.detokenize(padded, [3, n + 2, 4], skip_special_tokens=True)
    assert out.pieces == ["once", "", "upon"]
    assert out.piece_bytes == [b" once", b"", b" upon"] and out.text == " once upon"
    with pytest.raises(WorkerError) as e:
        tokens.detokenize(padded, [n + 8], skip_special_tokens=True)
    assert e.value.code == "INVALID_ARGUMENT"


def test_special_tokens_show_their_piece_unless_skipped(padded):
    shown = tokens.detokenize(padded, [1, 3, 2], skip_special_tokens=False)
    skipped = tokens.detokenize(padded, [1, 3, 2], skip_special_tokens=True)
    assert shown.text == "<s> once</s>" and skipped.text == " once"
    assert shown.pieces == skipped.pieces == ["<s>", "once", "</s>"]


def test_a_word_its_vocabulary_holds_only_as_a_special_token_is_unknown(padded):
    enc = tokens.tokenize(padded, "once <s> upon </s>", add_bos=True)
    assert enc.ids == [1, 3, 0, 4, 0] and enc.structural == [True] + [False] * 4


def test_limits(padded):
    with pytest.raises(WorkerError) as e:
        tokens.tokenize(padded, "a" * (MAX_TEXT_BYTES + 1), add_bos=False)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(WorkerError) as e:
        tokens.detokenize(padded, [3] * (MAX_IDS + 1), skip_special_tokens=True)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    assert len(tokens.detokenize(padded, [3] * MAX_IDS, skip_special_tokens=True).pieces) == MAX_IDS
