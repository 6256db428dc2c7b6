"""`positronic tokenize`: the exact ids and pieces the system would put in the cache."""

from __future__ import annotations

import argparse
import json
import sys

from positronic.flags import read_text_file
from positronic.models import DEMO_MODEL, demo_model_dir
from positronic.special_tokens import SpecialTokenPolicy, encode_prompt


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help=f"model directory or hub id (its tokenizer); default: the packaged demo model "
        f"({DEMO_MODEL})",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text to tokenize")
    src.add_argument(
        "--text-file", help="file whose whole content (UTF-8, \\r included) is tokenized"
    )
    p.add_argument("--bos", action="store_true", help="put BOS first, as a session start does")
    p.add_argument("--json", action="store_true", help='print {"ids": [...], "pieces": [...]}')


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def run(args: argparse.Namespace) -> int:
    try:
        text = read_text_file(args.text_file) if args.text_file else args.text
    except ValueError as e:
        print(f"positronic tokenize: --text-file {e}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.model or str(demo_model_dir()))
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
