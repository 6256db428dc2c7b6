"""Evaluation streams: disjoint, exact length, BOS before every story."""

from __future__ import annotations

import itertools

import pytest

from positronic.bench.streams import build_streams, read_stories, streams_from_file

BOS = 1


def test_streams_are_disjoint_and_exact():
    stories = [[10 + i] * (5 + i) for i in range(20)]  # story i: 5 + i copies of 10 + i
    streams = build_streams(stories[2:], BOS, count=3, tokens=12, first_story=2)
    assert [len(s.token_ids) for s in streams] == [12, 12, 12]
    assert streams[0].first_story == 2
    assert streams[0].token_ids[0] == BOS
    # Story 2 has 7 tokens, so the stream is BOS + 7 x 12, then BOS + story 3 cut.
    assert streams[0].token_ids == [BOS, *[12] * 7, BOS, 13, 13, 13]
    assert streams[0].stories == 2
    for a, b in itertools.pairwise(streams):
        assert b.first_story == a.first_story + a.stories
    used = [set(s.token_ids) - {BOS} for s in streams]
    assert not (used[0] & used[1]) and not (used[1] & used[2])


def test_not_enough_stories():
    with pytest.raises(ValueError, match="more stories"):
        build_streams([[5, 6]] * 3, BOS, count=2, tokens=10)
    with pytest.raises(ValueError):
        build_streams([[5, 6]], BOS, count=1, tokens=2)


def test_read_stories_splits_on_separator_lines(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("one story.\n<|endoftext|>\n\nTwo.\nLines.\n<|endoftext|>\n\n")
    assert read_stories(f) == ["one story.", "Two.\nLines."]


def test_streams_from_real_text_have_no_added_specials(stories260k_dir, tinystories_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories260k_dir)
    (s,) = streams_from_file(tok, tinystories_path, count=1, tokens=300, first_story=1)
    first = read_stories(tinystories_path)[1]
    text_ids = tok(first, add_special_tokens=False)["input_ids"]
    assert s.token_ids[0] == tok.bos_token_id
    assert s.token_ids[1 : 1 + 20] == text_ids[:20]  # exactly one BOS, no other special
    assert tok.eos_token_id not in s.token_ids


def test_story_text_that_spells_special_tokens_stays_text(stories260k_dir, tmp_path):
    """Benchmark streams get BOS only where a story starts: a story that writes "<s>" or "</s>"
    gets sentencepiece's ids for those characters."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories260k_dir)
    sp = spm.SentencePieceProcessor(model_file=str(stories260k_dir / "tokenizer.model"))
    stories = ["Tom said <s> hi </s> to Sue.", "The end</s><s>  of  it."]
    f = tmp_path / "s.txt"
    f.write_text("\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n")
    want = [1, *sp.encode(stories[0]), 1, *sp.encode(stories[1])]
    (s,) = streams_from_file(tok, f, count=1, tokens=len(want))
    assert s.token_ids == want
    assert [i for i, t in enumerate(s.token_ids) if t in (1, 2)] == [
        0,
        1 + len(sp.encode(stories[0])),
    ]
