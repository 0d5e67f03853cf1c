"""`lmstack data ...`: prepare a dataset folder, show its report, write the default corpus."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from lmstack.errors import InputError

if TYPE_CHECKING:
    from lmstack.data.config import DataConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="curate text into a versioned, tokenised dataset")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    prepare = sub.add_parser(
        "prepare",
        help="extract, filter, dedup, decontaminate, mix and tokenise text into train/val shards",
        description="Without INPUT, prepares the embedded default corpus (Python's own documentation).",
    )
    prepare.add_argument("inputs", nargs="*", metavar="INPUT", help="text, JSONL or HTML files or folders")
    prepare.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    prepare.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary when training one")
    prepare.add_argument("--tokenizer", type=Path, help="reuse this tokenizer folder instead of training one")
    prepare.add_argument("--jsonl-field", help="JSONL field holding the text (default: text)")
    prepare.add_argument("--eval", nargs="+", default=[], type=Path, metavar="FILE",
                         help="evaluation sets to decontaminate against")  # fmt: skip
    prepare.add_argument("--weights", nargs="+", metavar="SOURCE=W", help="mixing weights per source")
    prepare.add_argument("--val-fraction", type=float, help="share of documents held out (default 0.05)")
    prepare.add_argument("--seed", type=int, help="seed of the split, mixing and shard order (default 0)")
    prepare.add_argument("--config", type=Path, help="YAML or JSON file of DataConfig settings")
    prepare.add_argument("--no-reuse", action="store_true", help="rebuild even if the folder is up to date")
    prepare.add_argument("--quiet", action="store_true", help="print only the report")
    prepare.set_defaults(func=run_prepare)

    info = sub.add_parser("info", help="print the report of a prepared dataset folder")
    info.add_argument("path", type=Path, help="dataset folder")
    info.set_defaults(func=run_info)

    corpus = sub.add_parser("corpus", help="write the embedded default corpus as JSONL files")
    corpus.add_argument("--out", required=True, type=Path, help="folder to write into")
    corpus.set_defaults(func=run_corpus)


def parse_weights(items: list[str]) -> dict[str, float]:
    weights = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise InputError(f"bad weight {item!r} — write SOURCE=WEIGHT, e.g. wiki=0.7")
    return weights


def config_from_args(args: argparse.Namespace) -> DataConfig:
    """The `--config` file (or the defaults) with the command-line flags applied on top."""
    from lmstack.data.config import DataConfig

    config = DataConfig.load(args.config) if args.config else DataConfig()
    overrides = {}
    if args.jsonl_field:
        overrides["jsonl_field"] = args.jsonl_field
    if args.weights:
        overrides["weights"] = parse_weights(args.weights)
    if args.val_fraction is not None:
        overrides["val_fraction"] = args.val_fraction
    if args.seed is not None:
        overrides["seed"] = args.seed
    return dataclasses.replace(config, **overrides)


def run_prepare(args: argparse.Namespace) -> int:
    from lmstack.data.pipeline import prepare_dataset, prepare_default_dataset, report_text

    kwargs = dict(
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        config=config_from_args(args),
        eval_sets=args.eval,
        progress=not args.quiet,
        reuse=not args.no_reuse,
    )
    if args.inputs:
        info = prepare_dataset(args.inputs, args.out, **kwargs)
    else:
        info = prepare_default_dataset(args.out, **kwargs)
    print(report_text(info.path), end="")
    print(f"dataset written to {info.path}" + (" (already up to date)" if info.reused else ""))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from lmstack.data.pipeline import report_text

    print(report_text(args.path), end="")
    return 0


def run_corpus(args: argparse.Namespace) -> int:
    from lmstack.data.corpus import write_default_corpus

    for path in write_default_corpus(args.out):
        print(path)
    return 0
