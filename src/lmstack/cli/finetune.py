"""`lmstack finetune` and `lmstack merge`: thin wrappers over `lmstack.finetune.run.finetune` and
`lmstack.finetune.adapters.merge_adapter`.

lmstack finetune --model runs/base --adapter lora --out runs/loans            # the shipped loan set
lmstack finetune --model runs/base --data chats.jsonl --packing --epochs 2 --out runs/chat
lmstack finetune --model runs/chat --method dpo --data prefs.jsonl --out runs/dpo
lmstack finetune --resume --out runs/loans
lmstack finetune --model runs/base --adapter qlora --optimizer adamw8bit --out runs/qloans
lmstack merge --model runs/loans/base --adapter runs/loans/checkpoints/step_100/adapter --out merged/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from lmstack.errors import InputError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="supervised fine-tuning (SFT) or DPO of a model on JSONL, with or without LoRA/DoRA",
        description=(
            "Fine-tune a checkpoint or run folder on JSONL: {prompt, response} or {messages: [...]} for SFT, "
            "{prompt, chosen, rejected} for DPO. Without --data: the shipped loan-application set."
        ),
    )
    p.add_argument("--model", metavar="DIR", help="the base: a checkpoint or run folder")
    p.add_argument("--data", metavar="FILE", help="JSONL training data (default: the shipped loan set)")
    p.add_argument("--val-data", metavar="FILE", help="JSONL validation data (default: 10%% held out)")
    p.add_argument("--method", choices=("sft", "dpo"), help="default sft")
    p.add_argument("--out", metavar="DIR", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--adapter",
        choices=("none", "lora", "dora", "qlora"),
        help="default none (every weight trains); qlora: LoRA on the base stored in NF4",
    )
    p.add_argument("--lora-rank", type=int, metavar="R")
    p.add_argument("--lora-alpha", type=float, metavar="A")
    p.add_argument("--lora-dropout", type=float, metavar="P")
    p.add_argument(
        "--lora-targets", metavar="NAMES", help="q,v (default), any of q,k,v,o,gate,up,down, or all-linear"
    )
    p.add_argument("--rslora", action="store_true", default=None, help="scale by alpha/sqrt(r)")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit"))
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, metavar="N")
    length.add_argument("--epochs", type=float, metavar="E", help="default 1")
    p.add_argument("--packing", action="store_true", default=None, help="pack examples into full rows")
    p.add_argument("--truncate", choices=("drop", "left", "right"), help="over-long examples (default drop)")
    p.add_argument("--seq-len", type=int, metavar="N")
    p.add_argument("--batch-size", type=int, metavar="N")
    p.add_argument("--micro-batch-size", type=int, metavar="N")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int, metavar="N")
    p.add_argument("--beta", type=float, help="DPO's beta (default 0.1)")
    p.add_argument(
        "--sft-weight", type=float, metavar="W", help="DPO: add W x the chosen replies' NLL (RPO; default 0)"
    )
    p.add_argument("--reference", metavar="DIR", help="DPO's frozen reference (default: the base)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--threads", type=int, metavar="N")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_finetune)

    m = subparsers.add_parser(
        "merge",
        help="fold a LoRA/DoRA/QLoRA adapter folder into its base model",
        description=(
            "Merge a PEFT LoRA/DoRA adapter into its base and save an ordinary checkpoint folder. A QLoRA "
            "adapter is merged into the NF4-decoded base it was trained on."
        ),
    )
    m.add_argument("--model", required=True, metavar="DIR", help="the base the adapter was trained on")
    m.add_argument("--adapter", required=True, metavar="DIR", help="the adapter folder")
    m.add_argument("--out", required=True, metavar="DIR")
    m.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="fp32")
    m.set_defaults(func=run_merge)


def build_config(args: argparse.Namespace) -> Any:
    """FinetuneConfig from (the resumed run's saved config <) the flags given."""
    from lmstack.finetune.run import FINETUNE_CONFIG_FILE, FinetuneConfig

    values: dict[str, Any] = {}
    if args.resume:
        if not args.out:
            raise InputError("--resume needs the run folder — pass --out DIR")
        saved = Path(args.out) / FINETUNE_CONFIG_FILE
        if not saved.is_file():
            raise InputError(f"{args.out} has no {FINETUNE_CONFIG_FILE} — is it a fine-tuning run folder?")
        values.update(json.loads(saved.read_text(encoding="utf-8"))["config"])
    for f in dataclasses.fields(FinetuneConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    values["resume"] = bool(args.resume)
    if args.quiet:
        values["progress"] = False
    for name in ("model", "out"):
        if not values.get(name):
            raise InputError(f"--{name} is required — give the base model folder and the run folder")
    return FinetuneConfig(**values)


def run_finetune(args: argparse.Namespace) -> int:
    from lmstack.finetune.run import finetune

    result = finetune(build_config(args))
    t = result.train
    lines = [f"fine-tuned {t.step} steps ({t.stop_reason}); data: {result.data_summary}"]
    if t.val_loss is not None:
        lines.append(f"validation loss {t.val_loss:.3f} (step 0: {t.initial_val_loss:.3f})")
    lines.append(f"base {result.base['path']} (weights sha256 {result.base['sha256'][:12]}…)")
    lines.append(
        f"wrote {t.run_dir}/: checkpoint {t.checkpoint}"
        + (f", adapter {result.adapter}" if result.adapter else "")
    )
    lines += [f"note: {n}" for n in t.notes]
    print("\n".join(lines))
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from lmstack.finetune.adapters import merge_adapter

    out = merge_adapter(args.model, args.adapter, args.out, dtype=args.dtype)
    print(f"wrote {out} ({args.dtype})")
    return 0
