"""SFT + LoRA on the shipped loan-application set from a small pretrained model: how often the answers
to held-out applications parse as JSON and how many fields are exact, before and after fine-tuning.
Prints one JSON object.

python bench/finetune_loans.py --pretrain-minutes 4 --steps 300 --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def answers(model, tok, rows, max_new_tokens: int) -> list[str]:
    from lmstack.infer import generate

    prompts = [
        tok.render_chat([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)[0]
        for r in rows
    ]
    out = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    # generation stops at <|im_end|> (the chat base's EOS, whose rows train beside the adapters); cut at
    # a stray turn start or line break too, so a run-on answer is scored on its first line
    texts = [tok.decode(ids) for ids in out]
    return [t.split("<|im_end|>")[0].split("<|im_start|>")[0].split("\n")[0] for t in texts]


def measure(model, tok, rows, max_new_tokens: int) -> dict[str, float]:
    from lmstack.finetune.loans import score

    scores = [score(text, r["response"]) for text, r in zip(answers(model, tok, rows, max_new_tokens), rows)]
    return {
        "parseable": sum(p for p, _ in scores) / len(scores),
        "fields_exact": sum(f for _, f in scores) / len(scores),
        "all_fields_exact": sum(f == 1.0 for _, f in scores) / len(scores),
    }


def main() -> None:
    from lmstack.finetune.run import FinetuneConfig, finetune, shipped_dataset
    from lmstack.interop.folders import load_model_and_tokenizer
    from lmstack.train import TrainConfig, train

    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrain-minutes", type=float, default=4.0)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--adapter", default="lora")
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--heldout", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--base", default=None, help="a pretrained run to start from (skips pretraining)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.out or tempfile.mkdtemp())
    started = time.perf_counter()
    if args.base is None:
        base = train(TrainConfig(preset=args.preset, out=str(work / "base"), time_budget=args.pretrain_minutes,
                                 threads=args.threads, progress=False, sample_tokens=0))  # fmt: skip
        base_dir, base_loss = base.run_dir, base.val_loss
    else:
        base_dir, base_loss = Path(args.base), None
    pretrain_s = time.perf_counter() - started
    rows = [json.loads(line) for line in shipped_dataset("heldout").read_text().splitlines()][: args.heldout]
    start = time.perf_counter()
    result = finetune(FinetuneConfig(
        model=str(base_dir), out=str(work / "sft"), adapter=args.adapter, lora_targets=args.targets,
        lora_rank=args.rank, lora_alpha=2.0 * args.rank, max_steps=args.steps, batch_size=8, lr=args.lr,
        threads=args.threads, progress=False, eval_interval=100, checkpoint_interval=1000,
    ))  # fmt: skip
    finetune_s = time.perf_counter() - start
    before_model, tok = load_model_and_tokenizer(work / "sft" / "base")
    after_model, _ = load_model_and_tokenizer(result.train.checkpoint)
    before = measure(before_model.eval(), tok, rows, 96)
    after = measure(after_model.eval(), tok, rows, 96)
    print(json.dumps({
        "preset": args.preset, "pretrain_min": round(pretrain_s / 60, 2), "pretrain_val_loss": base_loss,
        "adapter": args.adapter, "targets": args.targets, "rank": args.rank, "steps": args.steps,
        "finetune_min": round(finetune_s / 60, 2), "sft_val_loss_start": result.train.initial_val_loss,
        "sft_val_loss_end": result.train.val_loss, "heldout": len(rows), "before": before, "after": after,
        "threads": args.threads, "example_answer": answers(after_model, tok, rows[:1], 96)[0],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
