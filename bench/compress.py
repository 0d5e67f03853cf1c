"""Quantized decode benchmark: prints one JSON object (and a short table on stderr).

`python bench/compress.py [--quick] [--threads 1,2] [--shapes S,..] [--methods M,..] [--no-perplexity] [--profile]`

1. Batch-1 greedy decode tokens/s and weight bytes of three random-weight shapes — GPT-2-124M, a
   Llama ~125M (GQA 12/4) and a deep thin one (30 layers x d 576, GQA 9/3, tied 49k vocabulary) —
   per method: fp32, bf16, int8, int4-g32, int4-g128, nf4, and with the LM head quantized too
   (int8+head, int4-g32+head, int4-g32+int8-head; a tied head from the shared matrix) (plus fp32 after
   `optimize_for_decode`, our best float layout). Decode rate = (N - 1) / (t(N new) - t(1 new)), so prefill is excluded; the
   methods run interleaved, best of n, in one process at a fixed thread count. Random weights decode
   as fast as trained ones: the time is reading the weights.
2. Perplexity on held-out tinyshakespeare (its last 10%) of a 25M-parameter Llama trained on the rest
   (every width a multiple of 256), trained here once with bench/infer.py's `train_plain` (~30 minutes
   on 2 cores) and cached in bench/.cache/ by its recipe. `--perplexity-only` runs just this part.
3. llama.cpp (llama-cpp-python) on the same weights exported by `lmstack export gguf` (f16, q8_0,
   q4_0, q4_k_m; cached in bench/.cache/gguf/ by weights and exporter source): `llamacpp_tok_s` is its
   batch-1 greedy decode rate after the same 32-token prompt, decode steps only, at the same thread
   count (n_threads = n_threads_batch), interleaved with ours; the `gguf-*` perplexity rows are
   llama.cpp's own logits on the same windows. `vs_llamacpp_q8_0` = our int8+head / llama.cpp Q8_0
   and `vs_llamacpp_q4_0` = our int4-g32+int8-head / llama.cpp Q4_0, per shape: llama.cpp's files
   quantize the head too (Q8_0; Q4_0 files Q8_0 or Q6_K), so these are the rows of matching bits per
   weight (`vs_llamacpp_configurations` names them); the `*_float_head` ratios are our default
   (float head) against the same files.
   llama.cpp repacks Q4_0/Q8_0/K-quant weights at load into AMX/AVX-512 layouts when it can; a
   subprocess probes that first (on some CPUs its AMX matmul segfaults), and `llamacpp.repack` says
   which setting the rows used.
`--profile` prints torch.profiler's top operators of decode steps of the Llama shape per method.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer import CACHE, DECODE_MODELS, TEXT, best_time, train_plain  # noqa: E402

from lmstack.compress import quantize  # noqa: E402
from lmstack.config import ModelConfig  # noqa: E402
from lmstack.infer import generate, optimize_for_decode  # noqa: E402
from lmstack.interop.gguf import export_gguf  # noqa: E402
from lmstack.interop.hf import from_pretrained, save_pretrained  # noqa: E402
from lmstack.model import build_model  # noqa: E402
from lmstack.tokenizer import Tokenizer  # noqa: E402

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
    # the LM head quantized too (a tied head from the shared matrix, the embedding lookup stays
    # float), as llama.cpp's files do: on a small model with a large vocabulary the head is a large
    # share of each step's bytes
    "int8+head": ("int8", None, True),
    "int4-g32+head": ("int4", 32, True),
    "int4-g32+int8-head": ("int4", 32, "int8"),
}
# GGUF rows: method -> `lmstack export gguf --type`; our method -> its llama.cpp peer at the same bits
GGUF_TYPES = {"gguf-f16": "f16", "gguf-q8_0": "q8_0", "gguf-q4_0": "q4_0", "gguf-q4_k_m": "q4_k_m"}
# The summary ratios compare the configuration whose bits per weight match llama.cpp's file, which
# quantizes the head too: Q8_0 files a Q8_0 head (ours: int8+head); Q4_0 files Q4_0 blocks with a
# Q8_0 head where the width is not a multiple of 256, else Q6_K (ours: int4-g32 blocks with an int8
# head, the same or 1.5 bits more per head weight). The `_float_head` ratios are our default (a
# bfloat16 copy of a float head while decoding), kept for comparison.
PEERS = {
    "vs_llamacpp_q8_0": ("int8+head", "gguf-q8_0"),
    "vs_llamacpp_q4_0": ("int4-g32+int8-head", "gguf-q4_0"),
    "vs_llamacpp_q8_0_float_head": ("int8", "gguf-q8_0"),
    "vs_llamacpp_q4_0_float_head": ("int4-g32", "gguf-q4_0"),
}
# widths multiples of 256, so the q4_k_m row holds real Q4_K/Q6_K tensors rather than their fallbacks
SMALL = dict(family="llama", d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=768, max_seq_len=256)
PROMPT = 32


def log(msg: str) -> None:
    print(f"[bench/compress] {msg}", file=sys.stderr, flush=True)


def variant(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """A copy of the float32 `model` stored as `method` asks."""
    spec = METHODS[method]
    if isinstance(spec, torch.dtype):
        return copy.deepcopy(model).to(spec)
    return quantize(
        copy.deepcopy(model), spec[0], group_size=spec[1], include_head=spec[2] if len(spec) > 2 else False
    )


def size_bytes(model: torch.nn.Module) -> int:
    """What the checkpoint holds: every tensor of the state dict (a tied head once)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ---- llama.cpp -------------------------------------------------------------------------------------
_SOURCES = [
    Path(__file__).resolve().parents[1] / "src" / "lmstack" / p for p in ("quant/ggml.py", "interop/gguf.py")
]


def cached_gguf(name: str, model: torch.nn.Module, tokenizer: Tokenizer, file_type: str) -> Path:
    """`model` exported as `file_type` by our exporter, cached by its weights' recipe and the exporter's
    source (a K-quant export of a 125M model takes a minute)."""
    recipe = hashlib.sha1(name.encode() + file_type.encode())
    for source in _SOURCES:
        recipe.update(source.read_bytes())
    path = CACHE / "gguf" / f"{name}-{file_type}-{recipe.hexdigest()[:10]}.gguf"
    if not path.exists():
        log(f"exporting {name} as {file_type} (once, cached in {path.parent})")
        export_gguf(model, tokenizer, path, file_type)
    return path


_PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, n_threads_batch=1, verbose=False)
llm.eval(list(range(8)))
llm.eval([1])
"""


def probe_repack(path: Path) -> dict:
    """Whether llama.cpp's default weight repacking (its AMX / CPU_REPACK buffer types) decodes `path`
    on this CPU, tried in a subprocess because where it fails it segfaults."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, timeout=600)
    if proc.returncode == 0:
        return {"repack": True, "probe": "ok"}
    crash = {-11: " (SIGSEGV)", 139: " (SIGSEGV)"}.get(proc.returncode, "")
    return {"repack": False, "probe": f"default repacking exited {proc.returncode}{crash} on {path.name}"}


@contextmanager
def llamacpp_params(repack: bool):
    """llama-cpp-python with llama.cpp's extra weight buffer types (repacking) on or off."""
    import llama_cpp

    module = llama_cpp.llama.llama_cpp
    default = module.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = repack
        return p

    module.llama_model_default_params = params
    try:
        yield llama_cpp
    finally:
        module.llama_model_default_params = default


def load_llamacpp(path: Path, threads: int, n_ctx: int, repack: bool, logits_all: bool = False):
    with llamacpp_params(repack) as llama_cpp:
        return llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
            n_threads_batch=threads, logits_all=logits_all, verbose=False,
        )  # fmt: skip


def llamacpp_decode_time(llm, prompt: list[int], n_new: int) -> float:
    """Seconds for `n_new` batch-1 greedy decode steps after `prompt` (the prefill is not timed)."""
    llm.reset()
    llm.eval(prompt)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(n_new):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return time.perf_counter() - start


def bench_tokenizer() -> Tokenizer:
    """A small byte-level tokenizer for the random-weight GGUF files (padded to each model's vocabulary)."""
    return Tokenizer.train([TEXT.read_text()[:20000]], 300, pattern="gpt2", special_tokens=["<|endoftext|>"])


def setup_llamacpp(skip: bool) -> tuple[dict | None, dict]:
    """The tokenizer for the GGUF exports and the repacking setting, or None where llama.cpp is absent."""
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    if skip or llama_cpp is None:
        why = "--no-llamacpp" if skip else "llama_cpp not installed (pip install llama-cpp-python)"
        return None, {"skipped": why}
    tokenizer = bench_tokenizer()
    probe_model = build_model(ModelConfig(vocab_size=512, **SMALL), seed=0).eval()
    probe = probe_repack(cached_gguf("repack-probe", probe_model, tokenizer, "q8_0"))
    log(
        f"llama.cpp {llama_cpp.__version__}: weight repacking {'on' if probe['repack'] else 'off'} ({probe['probe']})"
    )
    return {"tokenizer": tokenizer, **probe}, {"version": llama_cpp.__version__, **probe}


# ---- 1. decode ------------------------------------------------------------------------------------
def bench_decode(
    name: str,
    config: ModelConfig,
    threads: int,
    n_new: int,
    repeats: int,
    llamacpp: dict | None,
    methods: list[str] | None = None,
) -> dict:
    """Our methods' decode rates, and llama.cpp's on GGUF exports of the same weights (`llamacpp`:
    {"tokenizer", "repack"}, or None to skip them). `methods` limits ours (fp32 always runs: the
    speedups are against it)."""
    torch.set_num_threads(threads)
    base = build_model(config, seed=0).eval()
    ggufs, llms = {}, {}
    if llamacpp is not None:
        for method, file_type in GGUF_TYPES.items():
            ggufs[method] = cached_gguf(name, base, llamacpp["tokenizer"], file_type)
            llms[method] = load_llamacpp(ggufs[method], threads, PROMPT + n_new + 8, llamacpp["repack"])
    models, skipped = {}, {}
    for method in METHODS if methods is None else ["fp32", *[m for m in methods if m != "fp32"]]:
        try:
            models[method] = variant(base, method)
        except ValueError as exc:  # e.g. a group size that does not divide this shape's width
            skipped[method] = str(exc)
    tuned = copy.deepcopy(base)
    layout = optimize_for_decode(tuned)
    models["fp32-tuned-layout"] = tuned
    del base
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))

    def run(model, n):
        return generate(model, prompt, max_new_tokens=n, stop_ids=())[0]

    for model in models.values():
        run(model, 2)  # warm up (and pack the int4 weights for the CPU kernel)
    for llm in llms.values():
        llamacpp_decode_time(llm, prompt[0].tolist(), 2)
    samples: dict[str, list[tuple[float, float]]] = {m: [] for m in models}
    cpp_times: dict[str, list[float]] = {m: [] for m in llms}
    for _ in range(repeats):  # interleaved, so machine noise hits every method (and llama.cpp) alike
        for method, model in models.items():
            samples[method].append(
                (best_time(lambda m=model: run(m, n_new), 1), best_time(lambda m=model: run(m, 1), 1))
            )
        for method, llm in llms.items():
            cpp_times[method].append(llamacpp_decode_time(llm, prompt[0].tolist(), n_new))
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
    for method, times in cpp_times.items():  # our decode of a GGUF is its float import: fp32's row
        rows[method] = {"size_bytes": ggufs[method].stat().st_size, "decode_tok_s": None,
                        "llamacpp_tok_s": round(n_new / min(times), 2)}  # fmt: skip
    for ours, peer in PEERS.values():
        if "decode_tok_s" in rows.get(ours, {}) and peer in rows:
            rows[ours]["llamacpp_peer"] = peer
            rows[ours]["vs_llamacpp"] = round(rows[ours]["decode_tok_s"] / rows[peer]["llamacpp_tok_s"], 3)
    del llms
    return {"shape": name, "threads": threads, "params": sum(p.numel() for p in tuned.parameters()),
            "fp32_layout": layout, "methods": rows}  # fmt: skip


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
# The perplexity model: a 25M-parameter Llama whose matrices' rows are all 512 or 1536 long (multiples of
# 256), so llama.cpp's Q4_K_M export holds real Q4_K/Q6_K super-blocks, not their fallbacks; trained once
# on the first 90% of tinyshakespeare and cached by its recipe.
PPL_MODEL = dict(family="llama", d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, d_ff=1536, max_seq_len=256)
# steps x batch x seq = 2.0M tokens, about 5 passes over the 385k training tokens (~15 minutes on 2 idle
# cores); bf16 autocast (fp32 master weights and optimizer state): this CPU multiplies bf16 on its AMX units
PPL_RECIPE = dict(steps=500, lr=1e-3, batch=16, seq=256, autocast="bfloat16")


def shakespeare_target(quick: bool):
    """The perplexity model, its text's token ids, its name and its tokenizer: trained here once with
    bench/infer.py's `train_plain` (~15 minutes on 2 cores) and cached in bench/.cache/."""
    tok_dir = CACHE / "shakespeare-tokenizer"
    if not (tok_dir / "lmstack_tokenizer.json").exists():
        log("training the shakespeare tokenizer (once)")
        Tokenizer.train([TEXT], 1024, special_tokens=["<|endoftext|>"]).save(tok_dir)
    tok = Tokenizer.load(tok_dir)
    ids = torch.tensor(tok.encode_ordinary(TEXT.read_text()), dtype=torch.long)
    recipe = json.dumps([PPL_MODEL, PPL_RECIPE, tok.content_hash], sort_keys=True)
    folder = CACHE / f"compress-shakespeare-{hashlib.sha1(recipe.encode()).hexdigest()[:10]}"
    if not (folder / "config.json").exists():
        log(f"training the perplexity model (once, ~15 minutes on 2 cores; cached in {folder})")
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        config = ModelConfig(vocab_size=tok.vocab_size, eos_id=tok.eos_id, **PPL_MODEL)
        r = PPL_RECIPE
        start = time.perf_counter()
        # train_plain draws its windows from the first 90% of `ids`: the held-out windows stay unseen.
        # One autocast region spans every step, so its cache of the weights' bf16 copies must be off:
        # kept, the forward would multiply by the step-0 weights forever.
        with torch.autocast("cpu", dtype=getattr(torch, r["autocast"]), cache_enabled=False):
            model = train_plain(config, ids, steps=r["steps"], lr=r["lr"], batch=r["batch"], seq=r["seq"])
        log(f"trained in {time.perf_counter() - start:.0f} s")
        torch.set_num_threads(threads)
        save_pretrained(model, folder, tokenizer=tok)
    return from_pretrained(folder, dtype=torch.float32), ids, folder.name, tok


def held_out_windows(ids: torch.Tensor, windows: int, seq: int) -> list[torch.Tensor]:
    """`windows` consecutive windows of seq + 1 tokens of the held-out 10%."""
    held_out = ids[int(0.9 * len(ids)) :]
    return [held_out[w * seq : w * seq + seq + 1] for w in range(min(windows, (len(held_out) - 1) // seq))]


@torch.no_grad()
def perplexity(logits_of, chunks: list[torch.Tensor]) -> float:
    """exp(mean next-token cross-entropy) over the windows; `logits_of(ids)` -> (len(ids), vocab)."""
    total = sum(F.cross_entropy(logits_of(c[:-1]), c[1:], reduction="sum").item() for c in chunks)
    return math.exp(total / sum(len(c) - 1 for c in chunks))


def llamacpp_logits(llm):
    def logits(ids: torch.Tensor) -> torch.Tensor:
        llm.reset()
        llm.eval(ids.tolist())
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))

    return logits


def bench_perplexity(quick: bool, threads: int, llamacpp: dict | None) -> dict:
    """Perplexity of each method on the same held-out windows; the `gguf-*` rows are llama.cpp's."""
    model, ids, source, tok = shakespeare_target(quick)
    torch.set_num_threads(threads)
    seq = min(256, model.config.max_seq_len)
    chunks = held_out_windows(ids, 8 if quick else 40, seq)
    rows = {}
    for method in METHODS:
        try:
            quantized = variant(model, method)
        except ValueError as exc:
            rows[method] = {"skipped": str(exc)}
            continue
        ppl = perplexity(lambda x, m=quantized: m(x[None])[0].float(), chunks)
        rows[method] = {"size_bytes": size_bytes(quantized), "perplexity": round(ppl, 4)}
    if llamacpp is not None:
        for method, file_type in GGUF_TYPES.items():
            path = cached_gguf(source, model, tok, file_type)
            llm = load_llamacpp(path, threads, seq, llamacpp["repack"], logits_all=True)
            ppl = perplexity(llamacpp_logits(llm), chunks)
            rows[method] = {"size_bytes": path.stat().st_size, "perplexity": round(ppl, 4)}
            del llm
    fp32 = rows["fp32"]["perplexity"]
    for row in rows.values():
        if "perplexity" in row:
            row["perplexity_delta"] = round(row["perplexity"] / fp32 - 1, 5)
    tokens = sum(len(c) - 1 for c in chunks)
    return {"model": source, "params": model.num_parameters(), "tokens": tokens, "methods": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer tokens and repeats: ~6 minutes once the GGUF exports and the model are cached",
    )
    parser.add_argument("--threads", default="1", help="comma-separated thread counts, e.g. 1,2")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"subset of {','.join(SHAPES)}")
    parser.add_argument(
        "--methods", help=f"decode rows to run (fp32 always runs), a subset of {','.join(METHODS)}"
    )
    parser.add_argument("--no-perplexity", action="store_true", help="decode rows only")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables and exit")
    parser.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp rows")
    parser.add_argument("--perplexity-only", action="store_true", help="skip the decode part")
    args = parser.parse_args()
    if args.perplexity_only:
        args.shapes = ""
    threads = [int(t) for t in args.threads.split(",")]
    CACHE.mkdir(parents=True, exist_ok=True)
    if args.profile:
        profile_decode(SHAPES["llama-125m"], threads[0])
        return
    n_new, repeats = (12, 2) if args.quick else (48, 3)
    start = time.perf_counter()
    llamacpp, llamacpp_info = setup_llamacpp(args.no_llamacpp)
    decode = []
    for name in [s for s in args.shapes.split(",") if s]:
        for t in threads:
            log(f"decode {name}, {t} thread(s)")
            methods = args.methods.split(",") if args.methods else None
            decode.append(bench_decode(name, SHAPES[name], t, n_new, repeats, llamacpp, methods))
    ppl = None
    if not args.no_perplexity:
        log("perplexity")
        ppl = bench_perplexity(args.quick, threads[0], llamacpp)
    summary = {}
    for row in decode:
        key = f"{row['shape']}@{row['threads']}t"
        for method, label in (("int8", "int8"), ("int4-g32", "int4"), ("int4-g128", "int4_g128")):
            if "speedup_vs_fp32" in row["methods"].get(method, {}):
                summary.setdefault(f"{label}_decode_speedup", {})[key] = row["methods"][method][
                    "speedup_vs_fp32"
                ]
        for label, (method, peer) in PEERS.items():
            if "vs_llamacpp" in row["methods"].get(method, {}):
                summary.setdefault(label, {})[key] = row["methods"][method]["vs_llamacpp"]
                summary.setdefault("vs_llamacpp_configurations", {})[label] = (
                    f"ours {method} / llama.cpp {peer}"
                )
    result = {
        "quick": args.quick,
        "torch": torch.__version__,
        "decode_new_tokens": n_new,
        "repeats": repeats,
        "llamacpp": llamacpp_info,
        "decode": decode,
        "perplexity": ppl,
        **summary,
        "targets": {
            "int8_decode_speedup": 1.7,
            "int4_decode_speedup": 1.5,
            "vs_llamacpp_q8_0": 0.8,
            "vs_llamacpp_q4_0": 1.0,
            "int8_perplexity_delta": 0.01,
            "int4_g32_perplexity_delta": 0.05,
        },  # fmt: skip
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result, indent=2))
    for row in decode:
        log(f"{row['shape']} @ {row['threads']} thread(s): method  MB  tok/s  x fp32  llama.cpp tok/s")
        for method, r in row["methods"].items():
            if "skipped" in r:
                log(f"  {method:18s} skipped: {r['skipped']}")
            elif r["decode_tok_s"] is None:
                log(f"  {method:18s} {r['size_bytes'] / 1e6:8.1f} {'':15s} {r['llamacpp_tok_s']:7.2f}")
            else:
                log(
                    f"  {method:18s} {r['size_bytes'] / 1e6:8.1f} {r['decode_tok_s']:7.2f} {r['speedup_vs_fp32']:6.2f}"
                )
    for label, (method, peer) in PEERS.items():
        log(f"{label} ({method} / {peer}): {summary.get(label)}")
    if ppl is None:
        return
    log(f"perplexity ({ppl['model']}, {ppl['tokens']} held-out tokens):")
    for method, r in ppl["methods"].items():
        log(f"  {method:10s} {r.get('perplexity', r.get('skipped'))}  delta {r.get('perplexity_delta')}")


if __name__ == "__main__":
    main()
