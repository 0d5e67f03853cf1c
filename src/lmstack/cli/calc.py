"""`lmstack calc MODEL`: parameters, FLOPs, memory, KV cache, throughput and cost from a config.

MODEL is a preset name (`llama2-7b`), a Hugging Face `config.json`, or a checkpoint folder holding
one. The command parses arguments and calls `lmstack.arith.analyze`; `--json` prints its dict.
"""

from __future__ import annotations

import argparse
import json

from lmstack.config import ModelConfig
from lmstack.interop.folders import resolve_model_config


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmstack.arith.hardware import HARDWARE
    from lmstack.arith.memory import ADAPTERS, BITS

    p = subparsers.add_parser(
        "calc",
        help="every number from a config: params, FLOPs, memory, KV cache, throughput, cost",
        description=__doc__,
    )
    p.add_argument("model", metavar="MODEL", help="preset name, config.json path, or checkpoint folder")
    p.add_argument(
        "--hardware", default="h100-sxm", help=f"{', '.join(HARDWARE)}, or tflops=..,tbps=..,gib=.."
    )
    p.add_argument("--batch", type=int, default=1, help="concurrent sequences (default 1)")
    p.add_argument(
        "--context", type=int, default=None, help="tokens per sequence (default min(max_seq_len, 4096))"
    )
    p.add_argument("--dtype", default="bf16", help=f"weight dtype: {', '.join(BITS)} (default bf16)")
    p.add_argument("--kv-dtype", default=None, help="KV-cache dtype (default: the weight dtype, or bf16)")
    p.add_argument(
        "--gpus", type=int, default=1, help="GPUs (tensor-parallel for inference, data-parallel for training)"
    )
    p.add_argument(
        "--mfu", type=float, default=0.5, help="model FLOPs utilisation for prefill/training (default 0.5)"
    )
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank, alpha 2r (default 16)")
    p.add_argument(
        "--lora-targets",
        default="q,v",
        help="layers that get adapters: comma-separated names (q,k,v,o,gate,up,down,router) or all-linear "
        "(default q,v)",
    )
    p.add_argument(
        "--adapter",
        default="lora",
        choices=ADAPTERS,
        help="fine-tuning memory for: none (full), lora, dora, qlora (LoRA on an NF4 base); default lora",
    )
    p.add_argument(
        "--optimizer",
        default="adamw",
        choices=("adamw", "adamw8bit"),
        help="optimizer whose state is counted: adamw (fp32 moments) or adamw8bit (default adamw)",
    )
    p.add_argument(
        "--trainable-tokens",
        type=int,
        default=0,
        metavar="N",
        help="embedding (and untied head) rows trained beside the adapter, e.g. 2 for the ChatML tokens "
        "`lmstack finetune` adds to a base without a chat template (default 0)",
    )
    p.add_argument(
        "--causal", action="store_true", help="count causal attention pairs instead of the full s²"
    )
    p.add_argument("--price", type=float, default=3.0, help="dollars per GPU-hour (default 3.0)")
    p.add_argument(
        "--reserve", type=float, default=0.1, help="fraction of GPU memory kept free when serving (0.1)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmstack.arith import analyze, format_report

    config = load_config(args.model)
    result = analyze(
        config,
        hardware=args.hardware,
        batch=args.batch,
        context=args.context,
        dtype=args.dtype,
        kv_dtype=args.kv_dtype,
        gpus=args.gpus,
        mfu=args.mfu,
        lora_rank=args.lora_rank,
        lora_targets=args.lora_targets,
        adapter=args.adapter,
        optimizer=args.optimizer,
        trainable_tokens=args.trainable_tokens,
        causal=args.causal,
        price_per_gpu_hour=args.price,
        reserve_fraction=args.reserve,
    )
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def load_config(model: str) -> ModelConfig:
    """A preset name, a `config.json` file, or a checkpoint or run folder."""
    return resolve_model_config(model)[0]
