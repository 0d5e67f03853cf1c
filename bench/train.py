"""Training throughput of lmstack next to `transformers`, what `torch.compile` adds, and what two
minutes of training reach on tinyshakespeare; prints one JSON object.

1. Throughput: our `Transformer` and `transformers`' LlamaForCausalLM built from the same config and
   the same weights (our checkpoint loaded by transformers), each trained by the same step function
   (`lmstack.train.step.train_step`, AdamW, clipping) on the same batches. Repeats are interleaved
   (ours, theirs, ours, ...) so a noisy neighbour on a shared machine hits both; medians are reported.
   MFU = tokens/s × model FLOPs per token (lmstack.arith) / a measured matmul peak.
2. `torch.compile`: our model compiled (inductor) against eager, same protocol.
3. Quality: `lmstack.train.train` on the first 90% of tinyshakespeare for a 2-minute budget, then
   `lmstack.train.evaluate` on the last 10% (sliding window) — bits per byte and perplexity.

    python bench/train.py [--threads 2] [--preset small] [--repeats 5] [--minutes 2] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def _batches(shard: Path, batch: int, seq_len: int):
    from lmstack.data.loader import TokenBatches

    return TokenBatches(shard, batch, seq_len, seed=0)


def _time_steps(model, shard: Path, batch: int, seq_len: int, steps: int, warmup: int) -> float:
    """Tokens/s over `steps` timed optimizer steps after `warmup` untimed ones (fresh optimizer)."""
    from lmstack.train.optim import build_optimizer
    from lmstack.train.step import train_step

    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1)
    batches = _batches(shard, batch, seq_len)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        train_step(model, batches, optimizer, grad_clip=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch * seq_len / (time.perf_counter() - start)


def _dataset(workdir: Path, vocab_size: int) -> Path:
    """A prepared dataset of the embedded default corpus (what `lmstack train` trains on)."""
    from lmstack.data.corpus import write_default_corpus
    from lmstack.data.pipeline import prepare_dataset

    files = write_default_corpus(workdir / "corpus")
    prepare_dataset(files, workdir / "data", vocab_size=vocab_size)
    return workdir / "data"


def throughput(args, workdir: Path) -> dict:
    import transformers

    from lmstack.config import ModelConfig
    from lmstack.interop.hf import save_pretrained
    from lmstack.model import build_model
    from lmstack.train.metrics import measure_peak_flops, training_flops_per_token

    transformers.logging.set_verbosity_error()
    data = _dataset(workdir, args.vocab_size)
    shard = data / "train.bin"
    config = dataclasses.replace(
        ModelConfig.preset(args.preset), vocab_size=args.vocab_size, eos_id=args.vocab_size - 1
    )
    ours = build_model(config, seed=0)
    save_pretrained(ours, workdir / "ckpt")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(workdir / "ckpt", attn_implementation="sdpa")
    x = torch.randint(0, args.vocab_size, (1, 16))
    with torch.no_grad():  # same weights, same function
        diff = (ours.eval()(x) - theirs.eval()(x).logits).abs().max().item()

    flops_per_token, flops_source = training_flops_per_token(config, args.seq_len)
    peak = measure_peak_flops(torch.device("cpu"), seconds=2.0)
    runs: dict[str, list[float]] = {"lmstack": [], "transformers": []}
    for _ in range(args.repeats):
        for name, model in (("lmstack", ours), ("transformers", theirs)):
            runs[name].append(_time_steps(model, shard, args.batch, args.seq_len, args.steps, warmup=1))
    side = {
        name: {
            "tokens_per_s": statistics.median(values),
            "mfu": statistics.median(values) * flops_per_token / peak,
            "repeats_tokens_per_s": [round(v, 1) for v in values],
        }
        for name, values in runs.items()
    }
    out = {
        "model": {"preset": args.preset, "vocab_size": args.vocab_size, "parameters": ours.num_parameters()},
        "batch": args.batch,
        "seq_len": args.seq_len,
        "max_abs_logit_diff_same_weights": diff,
        "flops_per_token": flops_per_token,
        "flops_source": flops_source,
        "peak_flops_measured": peak,
        **side,
        "ratio_lmstack_over_transformers": side["lmstack"]["tokens_per_s"]
        / side["transformers"]["tokens_per_s"],
    }
    if not args.no_compile:
        out["torch_compile"] = compile_gain(ours, shard, args)
    return out


def compile_gain(model, shard: Path, args) -> dict:
    """Eager vs `torch.compile` (inductor) on our model, interleaved; compile time reported apart."""
    try:
        compiled = torch.compile(model)
        start = time.perf_counter()
        _time_steps(compiled, shard, args.batch, args.seq_len, 1, warmup=1)  # triggers compilation
        compile_s = time.perf_counter() - start
        eager, fast = [], []
        for _ in range(args.repeats):
            eager.append(_time_steps(model, shard, args.batch, args.seq_len, args.steps, warmup=1))
            fast.append(_time_steps(compiled, shard, args.batch, args.seq_len, args.steps, warmup=1))
    except Exception as exc:  # no C++ compiler, unsupported platform, ...
        return {"error": " ".join(f"{type(exc).__name__}: {exc}".split())[:300]}
    return {
        "eager_tokens_per_s": statistics.median(eager),
        "compiled_tokens_per_s": statistics.median(fast),
        "speedup": statistics.median(fast) / statistics.median(eager),
        "compile_s": compile_s,
    }


def shakespeare_quality(args, workdir: Path) -> dict:
    from lmstack.train import TrainConfig, evaluate, train

    if not SHAKESPEARE.is_file():
        return {"skipped": f"{SHAKESPEARE} not found"}
    text = SHAKESPEARE.read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1  # the last 10%, from a line start
    (workdir / "shakespeare_train.txt").write_text(text[:cut], encoding="utf-8")
    (workdir / "shakespeare_last10.txt").write_text(text[cut:], encoding="utf-8")
    config = TrainConfig(
        preset="tiny",
        data=(str(workdir / "shakespeare_train.txt"),),
        vocab_size=1024,
        out=str(workdir / "shakespeare_run"),
        time_budget=args.minutes,
        seq_len=128,
        batch_size=16,
        lr=3e-3,
        warmup_steps=20,
        eval_interval=100,
        eval_batches=8,
        checkpoint_interval=100_000,
        threads=args.threads,
        progress=False,
        sample_tokens=0,
    )
    start = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - start
    held_out = evaluate(result.checkpoint, workdir / "shakespeare_last10.txt", stride=64, seq_len=128)
    return {
        "preset": "tiny",
        "vocab_size": 1024,
        "time_budget_min": args.minutes,
        "wall_s": round(seconds, 1),
        "steps": result.step,
        "tokens_trained": result.step * config.batch_size * config.seq_len,
        "train_tokens_per_s": result.tokens_per_s,
        "last10_bits_per_byte": held_out.bits_per_byte,
        "last10_perplexity": held_out.perplexity,
        "last10_loss": held_out.loss,
        "last10_tokens": held_out.tokens,
        "eval": {"seq_len": held_out.seq_len, "stride": held_out.stride},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget on tinyshakespeare")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes and budgets: checks the script runs"
    )
    args = parser.parse_args()
    if args.quick:
        args.preset, args.batch, args.seq_len, args.steps, args.repeats, args.minutes = (
            "tiny",
            4,
            64,
            2,
            2,
            0.2,
        )
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        report = {
            "device": "cpu",
            "threads": args.threads,
            "torch": torch.__version__,
            "throughput": throughput(args, workdir),
            "tinyshakespeare": shakespeare_quality(args, workdir),
        }
    target = report["throughput"]["ratio_lmstack_over_transformers"]
    report["target_ours_at_least_0.95x"] = bool(target >= 0.95)
    json.dump(
        report,
        sys.stdout,
        indent=2,
        default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v),
    )
    print()


if __name__ == "__main__":
    main()
