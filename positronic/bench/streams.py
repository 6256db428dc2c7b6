"""Evaluation streams: long token sequences made of consecutive stories.

Each story is encoded without special tokens and preceded by BOS, as the TinyStories models were
trained (llama2.c pretokenizes every story with a leading BOS); stories follow one another until
the stream has its length. Streams are disjoint: stream j starts at the story after the last one
stream j - 1 used, so K streams start at K different stories.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from positronic.special_tokens import encode_text, text_encoder

STORY_SEPARATOR = "<|endoftext|>"


@dataclass(frozen=True)
class Stream:
    token_ids: list[int]  # [T], token_ids[0] is BOS
    first_story: int  # index of the story it starts at
    stories: int  # how many stories (some maybe cut) it spans


def read_stories(path: str | Path, separator: str = STORY_SEPARATOR) -> list[str]:
    """The non-empty stories of a text file, split at lines holding only `separator`."""
    text = Path(path).read_text(encoding="utf-8")
    return [s.strip() for s in text.split(separator) if s.strip()]


def build_streams(
    stories: Iterable[list[int]],
    bos_id: int,
    count: int,
    tokens: int,
    first_story: int = 0,
) -> list[Stream]:
    """`count` disjoint streams of exactly `tokens` ids from tokenized stories, read in order
    (lazily: an iterator is consumed only as far as the streams need). `first_story` is the
    index of the first story given, for the record.

    Raises ValueError when the stories run out first.
    """
    if count < 1 or tokens < 3:
        raise ValueError("need at least one stream of at least 3 tokens")
    it = iter(stories)
    streams: list[Stream] = []
    i = first_story
    for _ in range(count):
        start, ids = i, list[int]()
        while len(ids) < tokens:
            story = next(it, None)
            if story is None:
                raise ValueError(
                    f"{count} streams of {tokens} tokens need more stories than the "
                    f"{i - first_story} from story {first_story} on"
                )
            ids += [bos_id, *story]
            i += 1
        streams.append(Stream(ids[:tokens], start, i - start))
    return streams


def tokenize_stories(tokenizer, stories: Sequence[str]) -> list[list[int]]:
    """Each story's ids, no special tokens (special_tokens.encode_text)."""
    encoder = text_encoder(tokenizer)
    return [encode_text(encoder, s) for s in stories]


def streams_from_file(
    tokenizer, path: str | Path, count: int, tokens: int, first_story: int = 0
) -> list[Stream]:
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token to start streams with")
    stories = read_stories(path)
    if not 0 <= first_story < len(stories):
        raise ValueError(f"first story {first_story} is not among the {len(stories)} in {path}")
    encoder = text_encoder(tokenizer)  # built once: it loads and checks the vocabulary
    lazily = (encode_text(encoder, s) for s in stories[first_story:])
    return build_streams(lazily, int(bos), count, tokens, first_story)
