"""`lmstack train` and `lmstack eval`: thin wrappers over `lmstack.train.train` and `lmstack.train.evaluate`.

lmstack train                                   # BPE + `small` on the embedded corpus, ~10 minutes
lmstack train --data notes/ --preset tiny --max-steps 500 --out runs/notes
lmstack train --resume --out runs/notes         # continue exactly where the last checkpoint left off
lmstack train --resume --extend --max-steps 1000 --out runs/notes   # train a run on to a new total
lmstack train --init-from runs/notes --data more/ --out runs/more  # start from trained weights
lmstack eval --model runs/notes --data held_out.txt --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lmstack.errors import InputError

# flag destination -> TrainConfig field (only flags the user actually gave override the config)
FLAG_FIELDS = {
    "preset": "preset",
    "init_from": "init_from",
    "data": "data",
    "tokenizer": "tokenizer",
    "out": "out",
    "max_steps": "max_steps",
    "time_budget": "time_budget",
    "seed": "seed",
    "device": "device",
    "threads": "threads",
    "precision": "precision",
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a language model from raw text (no arguments: the built-in demo run)",
        description=(
            "Train a causal language model. With no arguments: train a BPE tokenizer and the `small` preset "
            "on the embedded default corpus (CPython documentation) for 10 minutes, then print validation "
            "perplexity, bits per byte and a sample. Distributed: torchrun --nproc_per_node N --no-python lmstack train ..."
        ),
    )
    p.add_argument("--preset", help="model preset (default small; see `lmstack info`)")
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="text/JSONL/HTML files or folders, or one prepared dataset folder",
    )
    p.add_argument(
        "--init-from",
        metavar="DIR",
        help="start from these weights (checkpoint, run or Hugging Face folder) instead of a fresh preset; "
        "its config and tokenizer are used",
    )
    p.add_argument("--tokenizer", metavar="DIR", help="reuse this tokenizer instead of training one")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<timestamp>)")
    p.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="train for about this long (default 10 without --max-steps)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (default: the newest in runs/) from its latest checkpoint",
    )
    p.add_argument(
        "--extend",
        action="store_true",
        help="with --resume and --max-steps N: train the run on to N steps (warmup unchanged, the cosine "
        "re-planned from the current step to N)",
    )
    p.add_argument("--seed", type=int, help="seed for initialisation, data order and dropout (default 0)")
    p.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file of TrainConfig fields; flags override it"
    )
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads per process")
    p.add_argument(
        "--precision", choices=("auto", "fp32", "bf16", "fp16"), help="default auto: fp32 on CPU, bf16 on GPU"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    p.set_defaults(func=run_train)

    e = subparsers.add_parser(
        "eval",
        help="perplexity and bits per byte of a model on a text file",
        description="Sliding-window perplexity and bits per byte of a checkpoint (or a run's latest) on a UTF-8 text file.",
    )
    e.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder or run folder")
    e.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file to score")
    e.add_argument(
        "--stride", type=int, metavar="N", help="tokens between window starts (default half the window)"
    )
    e.add_argument(
        "--seq-len", type=int, metavar="N", help="window length in tokens (default the model's context)"
    )
    e.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="windows per forward pass (default 8)"
    )
    e.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=run_eval)


def build_config(args: argparse.Namespace) -> Any:
    """TrainConfig from (the resumed run's saved config <) the --config file < the flags given."""
    from lmstack.train import TrainConfig
    from lmstack.train.build import TRAIN_CONFIG_FILE

    values: dict[str, Any] = {}
    if args.resume:
        run_dir = Path(args.out) if args.out else newest_run(Path("runs"))
        saved = run_dir / TRAIN_CONFIG_FILE
        if not saved.is_file():
            raise InputError(
                f"{run_dir} has no {TRAIN_CONFIG_FILE} — is it a run folder? Give the run with --out"
            )
        values.update(json.loads(saved.read_text(encoding="utf-8")))
        values["out"] = str(run_dir)
    if args.config:
        values.update(
            TrainConfig.load(args.config).to_dict() if not args.resume else _file_values(args.config)
        )
    for flag, name in FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            values[name] = value
    values["resume"] = bool(args.resume)
    values["extend"] = bool(args.extend)
    if args.extend and args.time_budget is None:
        values["time_budget"] = None  # an extension is counted in steps
    if args.quiet:
        values["progress"] = False
    return TrainConfig.from_dict(values)


def _file_values(path: str) -> dict[str, Any]:
    """Only the keys the file sets (on resume the saved config supplies the rest)."""
    from lmstack.textfile import read_settings_file
    from lmstack.train import TrainConfig

    TrainConfig.load(path)  # validates
    return read_settings_file(path)


def newest_run(runs: Path) -> Path:
    candidates = [p for p in runs.glob("*") if (p / "train_config.json").is_file()] if runs.is_dir() else []
    if not candidates:
        raise InputError(f"no run to resume in {runs}/ — give the run folder with --out")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def run_train(args: argparse.Namespace) -> int:
    from lmstack.train import train

    config = build_config(args)
    result = train(config)
    if result.checkpoint is None:
        return 0
    lines = [f"trained {result.step} steps ({result.stop_reason})"]
    if result.val_loss is not None:
        start = f" (step 0: {result.initial_val_loss:.3f})" if result.initial_val_loss is not None else ""
        lines.append(
            f"validation: loss {result.val_loss:.3f}{start}, perplexity {result.val_perplexity:.2f}, "
            f"bits per byte {result.val_bits_per_byte:.3f}"
        )
    if result.tokens_per_s:
        lines.append(f"throughput: {result.tokens_per_s:,.0f} tokens/s, MFU {100 * (result.mfu or 0):.1f}%")
    if result.sample is not None:
        lines.append("sample:\n" + _indent(result.sample))
    run = result.run_dir
    lines.append(
        f"wrote {run}/: checkpoint {result.checkpoint.relative_to(run)}, metrics.jsonl, loss.png, lr.png, train_config.json, data/"
    )
    lines.append(
        f'next: lmstack eval --model {run} --data FILE   |   lmstack generate --model {run} "prompt"'
    )
    for note in result.notes:
        lines.append(f"note: {note}")
    print("\n".join(lines))
    sys.stdout.flush()
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from lmstack.train import evaluate

    result = evaluate(
        args.model,
        args.data,
        stride=args.stride,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        device=args.device,
    )
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    else:
        print(
            f"{result.data}: {result.tokens:,} tokens, {result.bytes:,} bytes (window {result.seq_len}, stride {result.stride})\n"
            f"loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.3f}, bits per byte {result.bits_per_byte:.4f}"
        )
    return 0


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
