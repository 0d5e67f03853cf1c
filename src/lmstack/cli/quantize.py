"""`lmstack quantize --model DIR --method int8|int4|nf4 --out DIR`: a weight-only quantized checkpoint.

Loads the model and tokenizer `--model` names (a checkpoint or run folder), swaps its attention and MLP
projections for quantized linears (`lmstack.compress.quantize`) and saves model and tokenizer to
`--out`; config.json records the scheme, so every command loads the result like any other folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lmstack.compress import METHODS, quantization_config, quantize
from lmstack.errors import InputError
from lmstack.interop.folders import load_model_and_tokenizer, resolve_model_dir
from lmstack.interop.hf import save_pretrained


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize", help="write a weight-only quantized copy of a model", description=__doc__
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder or run folder")
    p.add_argument("--method", required=True, choices=METHODS, help="int8 (per channel), int4 (groups), nf4")
    p.add_argument(
        "--group-size", type=int, help="int4 group (32, 64, 128; default 128) or NF4 block (default 64)"
    )
    p.add_argument(
        "--include-head",
        nargs="?",
        const=True,
        default=False,
        choices=[True, *METHODS],
        metavar="METHOD",
        help="quantize the LM head too, with --method or the METHOD given (e.g. int4 blocks, int8 head); "
        "a tied head from the shared matrix, the embedding stays float",
    )
    p.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="folder to write (replaced atomically)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summary = quantize_folder(
        args.model, args.out, args.method, group_size=args.group_size, include_head=args.include_head
    )
    print(json.dumps(summary, indent=2))
    return 0


def quantize_folder(
    model_dir: str | Path,
    out: str | Path,
    method: str,
    *,
    group_size: int | None = None,
    include_head: bool | str = False,
) -> dict[str, Any]:
    """Quantize the model of a checkpoint or run folder and save it, with its tokenizer, to `out`."""
    source = resolve_model_dir(model_dir)
    if Path(out).expanduser().resolve() == source.resolve():
        raise InputError(f"--out {out} is the input checkpoint — write the quantized copy to a new folder")
    model, tokenizer = load_model_and_tokenizer(source)
    quantize(model, method, group_size=group_size, include_head=include_head)
    folder = save_pretrained(model, Path(out).expanduser(), tokenizer=tokenizer)
    record = quantization_config(model)
    assert record is not None
    return {
        "out": str(folder),
        "scheme": record["scheme"],
        "bits": record["bits"],
        "group_size": record["group_size"],
        "quantized_modules": len(record["modules"]),
        "source_bytes": _weight_bytes(source),
        "size_bytes": _weight_bytes(folder),
    }


def _weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
