"""`lmstack tokenizer train | encode | stats`: thin wrappers over `lmstack.tokenizer`."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from lmstack.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train and inspect byte-level BPE tokenizers")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)

    train = sub.add_parser("train", help="learn a BPE vocabulary from text files")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    train.add_argument("--vocab-size", type=int, required=True, help="bytes (256) + merges + specials")
    train.add_argument("--out", required=True, metavar="DIR", help="folder to write the tokenizer files to")
    train.add_argument(
        "--pattern", default="gpt4", help="split regex: gpt2, gpt4 (default) or a custom regex"
    )
    train.add_argument(
        "--special", nargs="*", default=[], metavar="TOKEN", help="special tokens, e.g. '<|endoftext|>'"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar (also off when not a TTY)")
    train.set_defaults(func=run_train)

    encode = sub.add_parser("encode", help="show the ids and byte pieces of a text")
    encode.add_argument("--tokenizer", required=True, metavar="DIR", help="a tokenizer or checkpoint folder")
    encode.add_argument(
        "--allow-special", action="store_true", help="encode special-token strings as specials"
    )
    encode.add_argument("text", metavar="TEXT")
    encode.set_defaults(func=run_encode)

    stats = sub.add_parser("stats", help="characters, bytes and words per token of a file")
    stats.add_argument("--tokenizer", required=True, metavar="DIR", help="a tokenizer or checkpoint folder")
    stats.add_argument("file", metavar="FILE")
    stats.set_defaults(func=run_stats)


def run_train(args: argparse.Namespace) -> int:
    from lmstack.tokenizer import Tokenizer

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = Tokenizer.train(
            [Path(p) for p in args.input],
            args.vocab_size,
            pattern=args.pattern,
            special_tokens=args.special,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    for warning in caught:  # e.g. "the corpus ran out of pairs": one line, not a Python warning dump
        print(f"lmstack: note: {warning.message}", file=sys.stderr)
    out = tok.save(args.out)
    seconds = time.perf_counter() - start
    print(
        f"trained {tok.vocab_size}-id tokenizer ({len(tok.merges)} merges, {_plural(len(tok.special_tokens), 'special')}, "
        f"pattern {tok.pattern_name}) in {seconds:.1f} s -> {out}"
    )
    print(f"content_hash {tok.content_hash}")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from lmstack.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    try:
        ids = tok.encode(args.text, allowed_special="all" if args.allow_special else frozenset())
    except InputError as exc:
        if "special token" not in str(exc):
            raise
        raise InputError(
            f"{str(exc).split(' — ')[0]} — pass --allow-special to encode it as a special token"
        ) from None
    print(f"{len(ids)} tokens: {ids}")
    for token_id in ids:
        print(f"{token_id:>8}  {_show_piece(tok.id_to_bytes(token_id))}")
    return 0


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _show_piece(data: bytes) -> str:
    """A token's bytes as readable text, or as bytes when they are not whole UTF-8 characters."""
    try:
        return repr(data.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(data)


def run_stats(args: argparse.Namespace) -> int:
    from lmstack.tokenizer import Tokenizer, measure_file

    tok = Tokenizer.load(args.tokenizer)
    stats = measure_file(tok, args.file)
    print(f"file        {args.file}")
    print("(rule of thumb, English with GPT-4's tokenizer: ~4 characters and ~0.75 words per token)")
    print(f"tokens      {stats.tokens:,}")
    print(f"characters  {stats.characters:,}  ({stats.chars_per_token:.2f} per token)")
    print(f"bytes       {stats.bytes:,}  ({stats.bytes_per_token:.2f} per token)")
    print(
        f"words       {stats.words:,}  ({stats.words_per_token:.3f} per token, {stats.tokens_per_word:.2f} tokens per word)"
    )
    return 0
