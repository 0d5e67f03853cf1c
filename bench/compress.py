"""Quantized decode benchmark: prints one JSON object (and a short table on stderr).

`python bench/compress.py [--quick] [--threads 1,2] [--profile]`

1. Batch-1 greedy decode tokens/s and weight bytes of three random-weight shapes — GPT-2-124M, a
   Llama ~125M (GQA 12/4) and a deep thin one (30 layers x d 576, GQA 9/3, tied 49k vocabulary) —
   per method: fp32, bf16, int8, int4-g32, int4-g128, nf4 (plus fp32 after `optimize_for_decode`, our
   best float layout). Decode rate = (N - 1) / (t(N new) - t(1 new)), so prefill is excluded; the
   methods run interleaved, best of n, in one process at a fixed thread count. Random weights decode
   as fast as trained ones: the time is reading the weights.
2. Perplexity on held-out tinyshakespeare of a model trained on the rest: bench/infer.py's cached
   target when present (bench/.cache/shakespeare-target-*), else a small one trained here once with
   bench/infer.py's `train_plain` and cached in bench/.cache/.
`--profile` prints torch.profiler's top operators of decode steps of the Llama shape per method.
`llamacpp_tok_s` stays null: llama.cpp runs through the GGUF export, which fills it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer import CACHE, DECODE_MODELS, TEXT, best_time, train_plain  # noqa: E402

from lmstack.compress import quantize  # noqa: E402
from lmstack.config import ModelConfig  # noqa: E402
from lmstack.infer import generate, optimize_for_decode  # noqa: E402
from lmstack.interop.hf import from_pretrained, save_pretrained  # noqa: E402
from lmstack.model import build_model  # noqa: E402

SHAPES = {
    **DECODE_MODELS,
    "deep-thin-135m": ModelConfig(
        family="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
        max_seq_len=2048, tie_embeddings=True,
    ),
}  # fmt: skip
# method -> (quantize method, group size[, include head]) or a float dtype
METHODS = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "int8": ("int8", None),
    "int4-g32": ("int4", 32),
    "int4-g128": ("int4", 128),
    "nf4": ("nf4", 64),
    # the LM head quantized too (untied models only): the float head is a large share of each step
    "int8+head": ("int8", None, True),
    "int4-g32+head": ("int4", 32, True),
}
SMALL = dict(family="llama", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=256)


def log(msg: str) -> None:
    print(f"[bench/compress] {msg}", file=sys.stderr, flush=True)


def variant(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """A copy of the float32 `model` stored as `method` asks."""
    spec = METHODS[method]
    if isinstance(spec, torch.dtype):
        return copy.deepcopy(model).to(spec)
    return quantize(copy.deepcopy(model), spec[0], group_size=spec[1], include_head=len(spec) > 2)


def size_bytes(model: torch.nn.Module) -> int:
    """What the checkpoint holds: every tensor of the state dict (a tied head once)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ---- 1. decode ------------------------------------------------------------------------------------
def bench_decode(name: str, config: ModelConfig, threads: int, n_new: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    base = build_model(config, seed=0).eval()
    models, skipped = {}, {}
    for method in METHODS:
        try:
            models[method] = variant(base, method)
        except ValueError as exc:  # e.g. a group size that does not divide this shape's width
            skipped[method] = str(exc)
    tuned = copy.deepcopy(base)
    layout = optimize_for_decode(tuned)
    models["fp32-tuned-layout"] = tuned
    del base
    prompt = torch.randint(0, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))

    def run(model, n):
        return generate(model, prompt, max_new_tokens=n, stop_ids=())[0]

    for model in models.values():
        run(model, 2)  # warm up (and pack the int4 weights for the CPU kernel)
    samples: dict[str, list[tuple[float, float]]] = {m: [] for m in models}
    for _ in range(repeats):  # interleaved, so machine noise hits every method alike
        for method, model in models.items():
            samples[method].append(
                (best_time(lambda m=model: run(m, n_new), 1), best_time(lambda m=model: run(m, 1), 1))
            )
    rows = {}
    for method, runs in samples.items():
        full, one = min(t[0] for t in runs), min(t[1] for t in runs)
        rows[method] = {
            "size_bytes": size_bytes(models[method]),
            "decode_tok_s": round((n_new - 1) / max(full - one, 1e-9), 2),
        }
    fp32 = rows["fp32"]["decode_tok_s"]
    for row in rows.values():
        row["speedup_vs_fp32"] = round(row["decode_tok_s"] / fp32, 3)
    for method, why in skipped.items():
        rows[method] = {"skipped": why}
    return {"shape": name, "threads": threads, "params": sum(p.numel() for p in tuned.parameters()),
            "fp32_layout": layout, "methods": rows, "llamacpp_tok_s": None}  # fmt: skip


def profile_decode(config: ModelConfig, threads: int) -> None:
    """torch.profiler's top operators of 8 decode steps per method, on stderr."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    base = build_model(config, seed=0).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    for method in ("fp32", "int8", "int4-g32", "nf4"):
        model = variant(base, method)
        generate(model, prompt, max_new_tokens=2, stop_ids=())
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(model, prompt, max_new_tokens=8, stop_ids=())
        log(f"profile {method}, {threads} thread(s), prefill 32 + 8 decode steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8), file=sys.stderr)


# ---- 2. perplexity ----------------------------------------------------------------------------------
def shakespeare_target(quick: bool):
    """bench/infer.py's trained target if cached, else a small model trained here once (and cached)."""
    from lmstack.tokenizer import Tokenizer

    cached = sorted(CACHE.glob("shakespeare-target-*/config.json"))
    tok_dir = CACHE / "shakespeare-tokenizer"
    if not (tok_dir / "lmstack_tokenizer.json").exists():
        log("training the shakespeare tokenizer (once)")
        Tokenizer.train([TEXT], 1024, special_tokens=["<|endoftext|>"]).save(tok_dir)
    tok = Tokenizer.load(tok_dir)
    ids = torch.tensor(tok.encode_ordinary(TEXT.read_text()), dtype=torch.long)
    if cached:
        return from_pretrained(cached[-1].parent, dtype=torch.float32), ids, cached[-1].parent.name
    steps, lr = 300, 3e-3
    recipe = json.dumps([SMALL, steps, lr], sort_keys=True)
    folder = CACHE / f"compress-shakespeare-{hashlib.sha1(recipe.encode()).hexdigest()[:10]}"
    if not (folder / "config.json").exists():
        log(f"training a small shakespeare model (once, cached in {folder})")
        torch.set_num_threads(2)
        config = ModelConfig(vocab_size=tok.vocab_size, eos_id=tok.eos_id, **SMALL)
        save_pretrained(train_plain(config, ids, steps=steps, lr=lr), folder, tokenizer=tok)
    return from_pretrained(folder, dtype=torch.float32), ids, folder.name


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, windows: int, seq: int) -> float:
    """exp(mean next-token cross-entropy) over `windows` consecutive windows of the held-out 10%."""
    held_out = ids[int(0.9 * len(ids)) :]
    total, count = 0.0, 0
    for w in range(min(windows, (len(held_out) - 1) // seq)):
        chunk = held_out[w * seq : w * seq + seq + 1]
        logits = model(chunk[None, :-1]).float()
        total += F.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
        count += seq
    return math.exp(total / count)


def bench_perplexity(quick: bool, threads: int) -> dict:
    model, ids, source = shakespeare_target(quick)
    torch.set_num_threads(threads)
    seq = min(256, model.config.max_seq_len)
    windows = 8 if quick else 40
    rows = {}
    for method in METHODS:
        try:
            rows[method] = {"perplexity": round(perplexity(variant(model, method), ids, windows, seq), 4)}
        except ValueError as exc:
            rows[method] = {"skipped": str(exc)}
    fp32 = rows["fp32"]["perplexity"]
    for row in rows.values():
        if "perplexity" in row:
            row["perplexity_delta"] = round(row["perplexity"] / fp32 - 1, 5)
    return {"model": source, "params": model.num_parameters(), "tokens": windows * seq, "methods": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats: under ~5 minutes")
    parser.add_argument("--threads", default="1", help="comma-separated thread counts, e.g. 1,2")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"subset of {','.join(SHAPES)}")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables and exit")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    CACHE.mkdir(parents=True, exist_ok=True)
    if args.profile:
        profile_decode(SHAPES["llama-125m"], threads[0])
        return
    n_new, repeats = (12, 2) if args.quick else (48, 3)
    start = time.perf_counter()
    decode = []
    for name in [s for s in args.shapes.split(",") if s]:
        for t in threads:
            log(f"decode {name}, {t} thread(s)")
            decode.append(bench_decode(name, SHAPES[name], t, n_new, repeats))
    log("perplexity")
    ppl = bench_perplexity(args.quick, threads[0])
    summary = {}
    for row in decode:
        key = f"{row['shape']}@{row['threads']}t"
        for method, label in (("int8", "int8"), ("int4-g32", "int4"), ("int4-g128", "int4_g128")):
            if "speedup_vs_fp32" in row["methods"].get(method, {}):
                summary.setdefault(f"{label}_decode_speedup", {})[key] = row["methods"][method][
                    "speedup_vs_fp32"
                ]
    result = {
        "quick": args.quick,
        "torch": torch.__version__,
        "decode_new_tokens": n_new,
        "repeats": repeats,
        "decode": decode,
        "perplexity": ppl,
        **summary,
        "targets": {
            "int8_decode_speedup": 1.7,
            "int4_decode_speedup": 1.5,
            "int8_perplexity_delta": 0.01,
            "int4_g32_perplexity_delta": 0.05,
        },  # fmt: skip
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result, indent=2))
    for row in decode:
        log(f"{row['shape']} @ {row['threads']} thread(s): method  MB  tok/s  x fp32")
        for method, r in row["methods"].items():
            if "skipped" in r:
                log(f"  {method:18s} skipped: {r['skipped']}")
            else:
                log(
                    f"  {method:18s} {r['size_bytes'] / 1e6:8.1f} {r['decode_tok_s']:7.2f} {r['speedup_vs_fp32']:6.2f}"
                )
    log(f"perplexity ({ppl['model']}, {ppl['tokens']} held-out tokens):")
    for method, r in ppl["methods"].items():
        log(f"  {method:10s} {r.get('perplexity', r.get('skipped'))}  delta {r.get('perplexity_delta')}")


if __name__ == "__main__":
    main()
