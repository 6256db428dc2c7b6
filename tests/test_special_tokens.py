"""The special-token policy: nothing enters the cache that nobody asked for (invariant 4).

Checks ids, never the tokenizer's flags: after a save and reload those misreport.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from positronic.special_tokens import (
    SpecialTokenPolicy,
    decode_pieces,
    encode_prompt,
    encode_text,
)
from tests.conftest import REPO

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


def test_pieces_in_context_keep_word_start_spaces(tok):
    ids = encode_text(tok, "Hello world")
    assert decode_pieces(tok, ids) == ["Hello", " world"]
    assert "".join(decode_pieces(tok, ids[1:], context=ids[:1])) == " world"


def test_tokenize_cli_json(llama2_tokenizer_dir, sp, tmp_path):
    text = text_of_exactly(sp, 300)
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
    assert len(with_bos["pieces"]) == 301
