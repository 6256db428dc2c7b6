"""`positronic tokenize`: the exact ids and pieces the system would put in the cache."""

from __future__ import annotations

import argparse
import json
import sys

from positronic.special_tokens import SpecialTokenPolicy, encode_prompt


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory or hub id (its tokenizer)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text to tokenize")
    src.add_argument("--text-file", help="file whose whole content (UTF-8) is tokenized")
    p.add_argument("--bos", action="store_true", help="put BOS first, as a session start does")
    p.add_argument("--json", action="store_true", help='print {"ids": [...], "pieces": [...]}')


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def run(args: argparse.Namespace) -> int:
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    else:
        text = args.text
    tokenizer = load_tokenizer(args.model)
    enc = encode_prompt(tokenizer, text, SpecialTokenPolicy(bos_at_session_start=args.bos))
    if args.json:
        json.dump(
            {"ids": enc.ids, "pieces": enc.pieces, "structural": enc.structural},
            sys.stdout,
            ensure_ascii=False,
        )
        sys.stdout.write("\n")
        return 0
    print(f"{len(enc)} tokens ({sum(enc.structural)} structural)")
    for i, (tid, piece, s) in enumerate(zip(enc.ids, enc.pieces, enc.structural, strict=True)):
        print(f"{i:6d} {tid:8d}  {piece!r}{'  [structural]' if s else ''}")
    return 0
