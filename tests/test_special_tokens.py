"""The special-token policy: nothing enters the cache that nobody asked for (invariant 4).

Checks ids, never the tokenizer's flags: after a save and reload those misreport.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from positronic.special_tokens import SpecialTokenPolicy, TextEncoder, encode_prompt, encode_text
from positronic.token_text import TokenTable
from tests.conftest import REPO, shared_path

BOS, EOS = 1, 2
SENTENCE = "Once upon a time, a little fox named Tilly found a shiny red ball in the garden. "


@pytest.fixture(scope="module")
def tok(llama2_tokenizer_dir):
    return AutoTokenizer.from_pretrained(llama2_tokenizer_dir)


@pytest.fixture(scope="module")
def sp(llama2_tokenizer_dir):
    return spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_dir / "tokenizer.model"))


def text_of_exactly(sp, n: int) -> str:
    """A long prompt of our own with exactly n sentencepiece tokens."""
    words = (SENTENCE * (n // 10 + 2)).split(" ")
    lo, hi = 1, len(words)
    while lo < hi:  # longest prefix of words with at most n pieces
        mid = (lo + hi + 1) // 2
        if len(sp.encode(" ".join(words[:mid]))) <= n:
            lo = mid
        else:
            hi = mid - 1
    text = " ".join(words[:lo])
    while len(sp.encode(text)) < n:  # top up one piece at a time
        text += "!"
    assert len(sp.encode(text)) == n
    return text


@pytest.mark.parametrize("n", [1, 7, 100, 862])
def test_text_of_n_pieces_gives_n_ids_and_n_plus_one_with_bos(tok, sp, n):
    text = text_of_exactly(sp, n)
    assert encode_text(tok, text) == sp.encode(text)
    no_bos = encode_prompt(tok, text, SpecialTokenPolicy(bos_at_session_start=False))
    assert no_bos.ids == sp.encode(text) and not any(no_bos.structural)
    with_bos = encode_prompt(tok, text)
    assert len(with_bos) == n + 1
    assert with_bos.ids[0] == BOS and with_bos.structural == [True] + [False] * n
    assert with_bos.ids[1:] == no_bos.ids
    assert EOS not in with_bos.ids


def test_862_becomes_863_with_default_settings_and_not_with_the_policy(tok, sp, tmp_path):
    """The seed's surprise: 862 tokens counted, 863 in the cache. Default tokenizer calls add a
    BOS (and, with add_eos_token, an EOS) behind the caller's back; the policy adds neither."""
    text = text_of_exactly(sp, 862)
    surprise = tok(text)["input_ids"]  # defaults, as in the seed's fixture
    assert len(surprise) == 863 and surprise[0] == BOS  # the surprise, reproduced
    eos_tok = AutoTokenizer.from_pretrained(tok.name_or_path, add_eos_token=True)
    both = eos_tok(text)["input_ids"]
    assert len(both) > 862 and both[-1] == EOS  # here: BOS dropped, EOS appended -> 863
    for t in (tok, eos_tok):
        assert len(encode_text(t, text)) == 862
        assert encode_prompt(t, text, SpecialTokenPolicy(bos_at_session_start=False)).ids == (
            sp.encode(text)
        )
    # After a save and reload, check ids (flags can misreport): still exactly 862.
    eos_tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(encode_text(reloaded, text)) == 862
    assert encode_text(reloaded, text)[0] != BOS


def test_eos_only_when_asked(tok):
    enc = encode_prompt(tok, "The end", SpecialTokenPolicy(eos_at_end=True))
    assert enc.ids[0] == BOS and enc.ids[-1] == EOS
    assert enc.structural[0] and enc.structural[-1] and not any(enc.structural[1:-1])


# Text that spells special tokens, byte-fallback pieces, emoji, other scripts, whitespace runs.
FRAGMENTS = [
    *("<s>", "</s>", "<unk>", "<pad>", "<mask>", "[MASK]", "<|endoftext|>", "<0x41>", "<0xF0>"),
    *("<", ">", "s", "/", "a", "b", "The", " cat", ".", "é", "🐱", "日本", "\u00a0", "▁", "ﬁ"),
    *(" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n"),
]
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=12).map(
    "".join
)
TOKENIZERS = ["llama2-tokenizer", "stories260K"]


@dataclass(frozen=True, repr=False)
class Real:
    tok: object  # the HF tokenizer
    sp: spm.SentencePieceProcessor  # sentencepiece on the same tokenizer.model
    encoder: TextEncoder
    hf_encoder: TextEncoder  # the path for tokenizers without a sentencepiece model
    table: TokenTable


@pytest.fixture(scope="module", params=TOKENIZERS)
def real(request) -> Real:
    d = shared_path("models", request.param)
    tok = AutoTokenizer.from_pretrained(d)
    return Real(
        tok=tok,
        sp=spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model")),
        encoder=TextEncoder(tok),
        hf_encoder=TextEncoder(tok, use_sentencepiece=False),
        table=TokenTable.from_tokenizer(tok),
    )


SPECIAL = {0, 1, 2}  # <unk>, <s>, </s> in both vocabularies
FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def test_special_token_strings_are_text(real):
    assert real.encoder.uses_sentencepiece
    for text in ("a<s>b", "<s>", "</s>", "<unk>", "x <pad> y", "</s></s><s>"):
        ids = encode_text(real.encoder, text)
        assert ids == real.sp.encode(text)
        assert not set(ids) & SPECIAL, text
        assert encode_prompt(real.encoder, text).ids == [1, *ids]  # BOS only where asked
    if len(real.tok) == 512:  # the example on stories260K: "▁a < s > b", not "▁a <s> b"
        assert encode_text(real.encoder, "a<s>b") == [261, 504, 419, 505, 430]
        assert real.tok("a<s>b", add_special_tokens=False)["input_ids"] == [261, 1, 430]


@FUZZ
@given(text=texts)
def test_ids_are_sentencepieces_own(real, text):
    ids = real.encoder.encode(text)
    assert ids == real.sp.encode(text)
    assert not set(ids) & SPECIAL


@FUZZ
@given(text=texts)
def test_without_sentencepiece_special_strings_are_still_text(real, text):
    """Tokenizers with no sentencepiece model go through split_special_tokens=True: never a
    special id, and the ids spell the text (after at most the word-start space; a "▁" in text
    is a space to a sentencepiece vocabulary)."""
    ids = real.hf_encoder.encode(text)
    assert not set(ids) & SPECIAL
    spelled = text.replace("▁", " ")
    assert real.table.text_of(ids) in (spelled, " " + spelled)


def test_hugging_face_alone_differs_from_sentencepiece_on_whitespace(real):
    """Why a sentencepiece tokenizer encodes with sentencepiece: the same vocabulary through
    Hugging Face's pipeline gives other ids for text starting with a space or a run of spaces
    (measured here; 2 of the 587 TinyStories validation stories differ on Llama 2's)."""
    for text in ("  a  b", " x"):
        assert real.hf_encoder.encode(text) != real.sp.encode(text)
        assert real.encoder.encode(text) == real.sp.encode(text)


def test_tokenize_cli_json(llama2_tokenizer_dir, sp, tmp_path):
    text = text_of_exactly(sp, 300) + " a<s>b </s>  <unk>"  # special-token strings are text
    f = tmp_path / "prompt.txt"
    f.write_text(text, encoding="utf-8")
    base = [
        sys.executable,
        "-m",
        "positronic.cli",
        "tokenize",
        "--model",
        str(llama2_tokenizer_dir),
        "--text-file",
        str(f),
        "--json",
    ]
    plain = json.loads(
        subprocess.run(base, check=True, capture_output=True, text=True, cwd=REPO).stdout
    )
    with_bos = json.loads(
        subprocess.run(
            [*base, "--bos"], check=True, capture_output=True, text=True, cwd=REPO
        ).stdout
    )
    assert plain["ids"] == sp.encode(text)
    assert plain["pieces"] == sp.encode(text, out_type=str)
    assert with_bos["ids"] == [BOS, *sp.encode(text)]
    assert len(with_bos["pieces"]) == len(sp.encode(text)) + 1
    assert with_bos["structural"] == [True] + [False] * len(sp.encode(text))
