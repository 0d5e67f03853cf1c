"""SFT + LoRA on the shipped loan-application set from a small pretrained model: how often the answers
to held-out applications parse as JSON and how many fields are exact, before and after fine-tuning.
Prints one JSON object.

python bench/finetune_loans.py --pretrain-minutes 4 --steps 300 --threads 2
python bench/finetune_loans.py --base tests/finetune/loan_base --steps 600 --lr 5e-3 --seed 0   # the test's run
python bench/finetune_loans.py --save-base tests/finetune/loan_base   # re-make the learning test's base

`--pretrain repeat` (and `--save-base`) makes a base that can copy from its context: a byte-level
Llama (d 64, `--layers` 4), pretrained 3000 steps of 16 x 128 on the default corpus where half the
windows are a passage of 8-65 bytes repeated to fill the window. Repetition makes induction heads form
(Olsson et al., 2022: attend to the token after an earlier occurrence of the current one and copy
it); measured by `induction_loss`, the loss on the second copy of held-out text against the first.
Copying the applicant and the amounts from the application into the answer needs exactly that, and
with bytes for tokens one matching byte is ambiguous: 2 layers reach a second-copy loss of ~1.2
nats/byte (first copy ~1.7) and copy names unreliably; 4 layers, which can match several bytes, ~0.6.
The learning test starts from the `--save-base` folder (deterministic: seed 0, 2 threads).
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


def pretrain_repeat(out: Path, steps: int, repeat: float, seed: int, layers: int = 4) -> dict[str, float]:
    """A byte-level base trained with repeated passages (see the module doc), saved to `out`."""
    import dataclasses

    import torch.nn.functional as F

    from lmstack.config import ModelConfig
    from lmstack.data.corpus import default_corpus
    from lmstack.interop.hf import save_pretrained
    from lmstack.model import build_model
    from lmstack.tokenizer import Tokenizer

    text = "\n\n".join(default_corpus())[:1_000_000]
    tok = Tokenizer.train([text[:10_000]], 257, special_tokens=["<|endoftext|>"], eos_token="<|endoftext|>")
    config = dataclasses.replace(
        ModelConfig.preset("tiny"), d_model=64, n_layers=layers, n_heads=4, n_kv_heads=4, head_dim=16, d_ff=168,
        vocab_size=tok.vocab_size, eos_id=tok.eos_id, max_seq_len=512, tie_embeddings=False,
    )  # fmt: skip
    model = build_model(config, seed=seed)
    data, gen = torch.tensor(tok.encode(text)), torch.Generator().manual_seed(seed)
    held = data[-20_000:].unfold(0, 64, 64)[:32]  # held-out passages, for the induction loss
    data = data[:-20_000]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    T, B = 128, 16
    for step in range(steps):
        opt.param_groups[0]["lr"] = 3e-3 * min(1.0, (step + 1) / 50)
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=gen).tolist()
        x = torch.stack([data[s : s + T + 1] for s in starts])
        for row in range(int(B * repeat)):
            n = int(torch.randint(8, 66, (1,), generator=gen))
            x[row] = x[row, :n].repeat(T // n + 2)[: T + 1]
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    save_pretrained(model, out, tokenizer=tok)
    with torch.no_grad():
        twice = torch.cat([held, held], dim=1)
        losses = F.cross_entropy(model(twice[:, :-1]).transpose(1, 2), twice[:, 1:], reduction="none")
    return {"first_copy": float(losses[:, :63].mean()), "second_copy": float(losses[:, 64:].mean())}


def main() -> None:
    from lmstack.finetune.run import FinetuneConfig, finetune, shipped_dataset
    from lmstack.interop.folders import load_model_and_tokenizer
    from lmstack.train import TrainConfig, train

    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrain", choices=("train", "repeat"), default="train")
    ap.add_argument("--pretrain-minutes", type=float, default=4.0)
    ap.add_argument("--pretrain-steps", type=int, default=3000, help="for --pretrain repeat")
    ap.add_argument("--layers", type=int, default=4, help="for --pretrain repeat")
    ap.add_argument(
        "--save-base", default=None, help="only make the --pretrain repeat base, into this folder"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
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
    induction = None
    if args.save_base:
        induction = pretrain_repeat(Path(args.save_base), args.pretrain_steps, 0.5, args.seed, args.layers)
        print(json.dumps({"base": args.save_base, "induction_loss": induction, "layers": args.layers,
                          "minutes": round((time.perf_counter() - started) / 60, 2)}))  # fmt: skip
        return
    if args.base is None and args.pretrain == "repeat":
        base_dir, base_loss = work / "base", None
        induction = pretrain_repeat(base_dir, args.pretrain_steps, 0.5, args.seed, args.layers)
    elif args.base is None:
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
        lora_rank=args.rank, lora_alpha=2.0 * args.rank, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        threads=args.threads, progress=False, eval_interval=100, checkpoint_interval=1000, seed=args.seed,
    ))  # fmt: skip
    finetune_s = time.perf_counter() - start
    before_model, tok = load_model_and_tokenizer(work / "sft" / "base")
    after_model, _ = load_model_and_tokenizer(result.train.checkpoint)
    before = measure(before_model.eval(), tok, rows, 200)  # a byte-level answer is ~130 tokens
    after = measure(after_model.eval(), tok, rows, 200)
    print(json.dumps({
        "preset": args.preset, "pretrain_min": round(pretrain_s / 60, 2), "pretrain_val_loss": base_loss,
        "pretrain": args.pretrain, "induction_loss": induction, "seed": args.seed,
        "adapter": args.adapter, "targets": args.targets, "rank": args.rank, "steps": args.steps, "batch_size": args.batch_size,
        "finetune_min": round(finetune_s / 60, 2), "sft_val_loss_start": result.train.initial_val_loss,
        "sft_val_loss_end": result.train.val_loss, "heldout": len(rows), "before": before, "after": after,
        "threads": args.threads, "example_answer": answers(after_model, tok, rows[:1], 200)[0],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
