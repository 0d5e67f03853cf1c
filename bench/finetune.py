"""Fine-tuning speed and memory of lmstack next to `peft` + `transformers` (+ `bitsandbytes`), and the
memory `lmstack.arith` predicts; prints one JSON object.

One Llama-shaped model with random weights is saved once as a Hugging Face folder
(`transformers.LlamaForCausalLM.save_pretrained`); both sides load it and train on the same token
batches (same batch, sequence length, rank, targets, fp32, thread count):

* lmstack: the objects `lmstack finetune` builds — `FinetuneConfig` → `build_method` (SFT with its
  `AdapterSetup`: `apply_lora`, DoRA, QLoRA) → `method.prepare`, the run's optimizer (`make_optimizer`:
  torch AdamW or `train/optim8bit.AdamW8bit`), and each step `train.step.accumulate_gradients` with
  `method.loss` (the SFT loss), then `optimizer.step()` — the loop's own step.
* peft: `get_peft_model(model, LoraConfig(target_modules=..., use_dora=...))`, full fine-tuning on the
  bare `transformers` model, QLoRA through `BitsAndBytesConfig(load_in_4bit, nf4, double quant)`;
  torch AdamW or `bitsandbytes.optim.AdamW8bit`; HF's own loss from `labels`; the same clipping.

Each row (setting × optimizer × side) runs in a fresh subprocess, so its memory is its own:
* `peak_rss_bytes`: `resource.getrusage(...).ru_maxrss` over the whole process (imports and loading
  included — `transformers` and `peft` cost a few hundred MB that the lmstack side never imports);
* `train_bytes`: the fine-tuning footprint as the OS sees it — the peak resident memory while
  training (the kernel's high-water mark is reset after loading, `/proc/self/clear_refs`) minus the
  resident memory before the model was loaded, after the libraries were imported. `memory_vs_peft`
  compares this figure; `predicted_vs_measured` = `predicted_bytes` / `train_bytes`.
* `train_allocated_bytes`: the same span counted in live heap allocations (glibc `mallinfo2`, sampled
  after every torch op during one extra step) plus the weights still memory-mapped from the
  checkpoint (`file_backed_bytes`). RSS also holds memory the allocator keeps after a free,
  so this is the figure `predicted_bytes` — `lmstack.arith.memory.finetune_memory`, the function
  behind `lmstack calc --adapter ... --optimizer ...`: weights, gradients, optimizer state,
  activations and the loss's peak — should match (`predicted_vs_allocated`). Stated tolerance:
  within ±20% at the default shape (measured 0.83–1.08 over the LoRA, DoRA and QLoRA rows of both
  sides); at `--quick` a fixed ~14 MB of runtime buffers the arithmetic does not model pulls it to
  0.68–0.99. RSS adds the allocator's retained memory: `predicted_vs_measured` ≈ 0.55–0.7. Most of
  that is glibc's dynamic mmap threshold (it rises after a large free, and later activations then
  come from the heap, which keeps freed pages): run with `MALLOC_MMAP_THRESHOLD_=1048576` and each
  side's RSS falls to its live allocations (LoRA at the default shape: 841 → 567 MiB for lmstack,
  863 → 594 for peft).
* `step_s`: the median of the timed optimizer steps after warm-up (`step_cpu_s`: of their process
  CPU time). The two sides of a setting are loaded one after the other, then stepped in turn (ours,
  theirs, theirs, ours, ...), so a busy neighbour on a shared machine slows both alike.
* `loss_first`: the first step's loss — equal on both sides (same weights, batches and objective;
  QLoRA's differs in the last digits, from the two NF4 implementations).

    python bench/finetune.py [--quick] [--threads 2] [--steps 6] [--warmup 2] [--only lora:adamw,...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ADAPTERS = ("none", "lora", "dora", "qlora")  # none = full fine-tuning
OPTIMIZERS = ("adamw", "adamw8bit")
SIDES = ("lmstack", "peft")
HF_NAMES = {  # our linear layer names -> transformers' Llama module names
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
SHAPES = {
    # ~32M parameters: d_model 512, 8 layers, GQA 8/4 heads, SwiGLU 1408, vocab 8192
    "default": dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=8192, batch=4, seq_len=256,
    ),
    # ~5M parameters, for a run of a few minutes
    "quick": dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=4096, batch=4, seq_len=128,
    ),
}  # fmt: skip


# ---- memory --------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int:
    """The kernel's high-water mark of resident memory (VmHWM) since start or the last reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: writing 5 to clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def allocated_bytes() -> int | None:
    """Bytes in live heap allocations (glibc `mallinfo2`: in-use arena chunks + mmapped chunks), which
    is where torch's CPU tensors live. Unlike RSS it drops when a tensor is freed; None off glibc."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost",
        )]  # fmt: skip

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def file_backed_bytes(model) -> int:
    """Bytes of the model's tensors that live in a memory-mapped file (safetensors loads weights that
    way), which the heap count misses: their storages' addresses fall in a file mapping."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(n for ptr, n in storages.items() if any(a <= ptr < b for a, b in ranges))


def peak_allocated_during(fn) -> int | None:
    """The most heap bytes live after any torch op while `fn()` runs (sampled by a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if allocated_bytes() is None:
        return None
    peak = [allocated_bytes()]

    class Sample(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            peak[0] = max(peak[0], allocated_bytes())
            return out

    with Sample():
        fn()
    return peak[0]


# ---- the shared inputs ---------------------------------------------------------------------------
def make_model_folder(folder: Path, shape: dict) -> None:
    """A Llama with random weights (transformers' default init) and a tokenizer, saved once for both sides."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = {k: v for k, v in shape.items() if k not in ("batch", "seq_len")}
    config = LlamaConfig(**hf, max_position_embeddings=shape["seq_len"], tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    # `lmstack finetune` reads the base's tokenizer (to find token rows a chat template added); the
    # batches are random ids, so a byte-level one with no merges serves
    from lmstack.tokenizer import Tokenizer

    Tokenizer.train(["a b"], 256, pattern="gpt2").save(folder)


def make_batches(vocab: int, batch: int, seq_len: int, count: int = 4) -> list[dict]:
    """Token rows of full length; the first quarter of each row is the 'prompt' (labels ignored), the
    rest the 'response', so the loss covers part of the tokens as in SFT. The same on both sides."""
    import torch

    from lmstack.finetune.data import IGNORE, Example, pad_batch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=g).tolist()
        prompt = seq_len // 4
        examples = [Example(tuple(r), tuple([IGNORE] * prompt + r[prompt:])) for r in ids]
        out.append(pad_batch(examples, pad_id=0))
    return out


# ---- the two sides -------------------------------------------------------------------------------
def lmstack_setup(job: dict, folder: Path, work: Path):
    """(model, optimizer, step function) exactly as `lmstack finetune` builds them."""
    import types

    import torch

    from lmstack.finetune.run import FinetuneConfig, build_method, train_config
    from lmstack.interop.hf import from_pretrained
    from lmstack.train.build import make_optimizer
    from lmstack.train.step import accumulate_gradients

    config = FinetuneConfig(
        model=str(folder), out=str(work / "run"), data=str(work / "unused.jsonl"), adapter=job["adapter"],
        lora_rank=job["rank"], lora_alpha=2.0 * job["rank"], lora_dropout=job["dropout"],
        lora_targets=",".join(job["targets"]), optimizer=job["optimizer"], lr=1e-4, weight_decay=0.0,
        batch_size=job["batch"], seq_len=job["seq_len"], threads=job["threads"], progress=False, seed=0,
    )  # fmt: skip
    method = build_method(config, folder, {"path": str(folder), "sha256": "-"})
    model = from_pretrained(folder, dtype=torch.float32)  # as the loop's `initial_model` loads init_from
    model = method.prepare(model, types.SimpleNamespace(seed=config.seed))  # SFT.prepare reads the seed
    model.train()
    tc = train_config(config, folder, job["warmup"] + job["steps"])
    optimizer = make_optimizer(tc, model, torch.device("cpu"))

    def step(batches) -> float:
        stats = accumulate_gradients(model, batches, optimizer, method.loss, grad_clip=tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return stats.loss

    return model, optimizer, step


def peft_setup(job: dict, folder: Path, work: Path):
    """(model, optimizer, step function) with transformers + peft (+ bitsandbytes)."""
    import torch
    from transformers import LlamaForCausalLM

    kwargs = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    if job["adapter"] == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
        kwargs["device_map"] = "cpu"
    model = LlamaForCausalLM.from_pretrained(folder, **kwargs)
    if job["adapter"] != "none":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=job["rank"], lora_alpha=2 * job["rank"], lora_dropout=job["dropout"], bias="none",
            target_modules=[HF_NAMES[t] for t in job["targets"]], use_dora=job["adapter"] == "dora",
            task_type="CAUSAL_LM",
        )  # fmt: skip
        model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if job["optimizer"] == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

    def step(batches) -> float:
        b = next(batches)
        out = model(input_ids=b["ids"], attention_mask=b["mask"].long(), labels=b["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    return model, optimizer, step


def predicted(job: dict, folder: Path) -> dict:
    """`lmstack.arith`'s fine-tuning memory for this row (fp32 training, as measured)."""
    from lmstack.arith.memory import finetune_memory
    from lmstack.interop.hf import config_from_hf

    config = config_from_hf(folder / "config.json")
    return finetune_memory(
        config, adapter=job["adapter"], rank=job["rank"], targets=tuple(job["targets"]),
        optimizer=job["optimizer"], batch=job["batch"], context=job["seq_len"], precision="fp32",
    )  # fmt: skip


def _failed(row: dict, e: Exception) -> dict:
    row["error"] = f"{type(e).__name__}: {e}".strip()[:600]
    row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
    row["peak_rss_bytes"] = maxrss_bytes()
    return row


def worker(job: dict) -> None:
    """One side's row in this fresh process, stepped by the driver: after setup it prints `ready`,
    then runs one optimizer step per `step` line on stdin (printing its time) and, on `done`, prints
    the row. Stepping both sides in turn means a noisy neighbour slows both alike."""
    import itertools

    import torch

    def say(obj: dict) -> None:
        print(json.dumps(obj), flush=True)

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    folder, work = Path(job["folder"]), Path(job["work"])
    row = {k: job[k] for k in ("side", "adapter", "optimizer")}
    row["setting"] = "full" if job["adapter"] == "none" else job["adapter"]
    try:
        prediction = predicted(job, folder)
        row["predicted_bytes"] = int(prediction["total_bytes"])
        row["predicted"] = {k: v for k, v in prediction.items() if k.endswith("_bytes")}
    except Exception as e:  # a prediction the arithmetic cannot make is reported, not fatal
        row["predicted_error"] = f"{type(e).__name__}: {e}"
    # the libraries are imported before the baseline: code, not the fine-tuning footprint
    # (torch.optim imports torch._dynamo, ~75 MB, when an optimizer is built; transformers at import)
    import torch._dynamo  # noqa: F401

    if job["side"] == "peft":
        import peft  # noqa: F401
        import transformers  # noqa: F401

        if job["optimizer"] == "adamw8bit" or job["adapter"] == "qlora":
            import bitsandbytes  # noqa: F401
    else:
        import lmstack.finetune.run  # noqa: F401
        import lmstack.finetune.sft  # noqa: F401
        import lmstack.interop.hf  # noqa: F401
        import lmstack.train.build  # noqa: F401
        import lmstack.train.optim8bit  # noqa: F401
    batches = make_batches(job["vocab"], job["batch"], job["seq_len"])
    before_load, allocated_before_load = rss_bytes(), allocated_bytes()
    try:
        setup = lmstack_setup if job["side"] == "lmstack" else peft_setup
        model, optimizer, step = setup(job, folder, work)
    except Exception as e:
        say({"failed": True, **_failed(row, e)})
        return
    row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row["loaded_bytes"] = rss_bytes() - before_load
    load_peak = maxrss_bytes()
    hwm_reset = reset_hwm()
    stream = itertools.cycle(batches)
    times, cpu_times, losses = [], [], []
    say({"ready": True})
    for line in sys.stdin:
        if line.strip() != "step":
            break
        try:
            started, cpu = time.perf_counter(), time.process_time()
            losses.append(step(stream))
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu)
        except Exception as e:
            say({"failed": True, **_failed(row, e)})
            return
        say({"step_s": times[-1]})
    train_peak = hwm_bytes() if hwm_reset else maxrss_bytes()
    warm = job["warmup"]
    row["peak_rss_bytes"] = max(load_peak, maxrss_bytes(), train_peak)
    row["train_bytes"] = train_peak - before_load
    row["train_bytes_includes_loading"] = not hwm_reset
    # one more step, untimed, sampling the live heap after every op; plus the weights still mapped
    # from the checkpoint file (resident, but not on the heap)
    peak = peak_allocated_during(lambda: step(stream))
    if peak is not None and allocated_before_load is not None:
        row["file_backed_bytes"] = file_backed_bytes(model)
        row["train_allocated_bytes"] = peak - allocated_before_load + row["file_backed_bytes"]
    row["step_s"] = statistics.median(times[warm:])
    row["step_cpu_s"] = statistics.median(cpu_times[warm:])
    row["step_times_s"] = [round(t, 4) for t in times]
    row["loss_first"], row["loss_last"] = losses[0], losses[-1]
    if "predicted_bytes" in row:
        row["predicted_vs_measured"] = row["predicted_bytes"] / row["train_bytes"]
        if row.get("train_allocated_bytes"):
            row["predicted_vs_allocated"] = row["predicted_bytes"] / row["train_allocated_bytes"]
    say(row)


# ---- the driver ----------------------------------------------------------------------------------
def child_env() -> dict:
    """The environment of the subprocesses: this checkout's lmstack first on the path."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class Worker:
    """A worker subprocess and its line protocol."""

    def __init__(self, job: dict) -> None:
        self.job, self.result = job, None
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(job)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.err, text=True, env=child_env(),
        )  # fmt: skip

    def read(self) -> dict:
        """The worker's next JSON line; a failure or exit becomes the row's result."""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                self.err.seek(0)
                tail = " | ".join(self.err.read().strip().splitlines()[-3:])
                self.result = self.result or {
                    **{k: self.job[k] for k in ("side", "adapter", "optimizer")},
                    "error": f"worker exited with {self.proc.returncode}: {tail}"[:600],
                }
                return {"failed": True}
            if line.startswith("{"):
                msg = json.loads(line)
                if msg.pop("failed", False):
                    self.result = msg
                    self.proc.wait()
                    return {"failed": True}
                return msg

    @property
    def alive(self) -> bool:
        return self.result is None

    def send(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def finish(self) -> dict:
        if self.alive:
            self.result = self.send("done")
            self.proc.wait()
        self.err.close()
        return self.result


def run_pair(jobs: list[dict], steps: int) -> list[dict]:
    """Both sides of one setting, loaded in turn (so loading never overlaps a timed step), then
    stepped alternately (ours, theirs, theirs, ours, ...): each step time sees the same neighbours."""
    workers = []
    for job in jobs:
        w = Worker(job)
        w.read()  # "ready", or a failure
        workers.append(w)
    for i in range(steps):
        for w in workers if i % 2 == 0 else workers[::-1]:
            if w.alive:
                w.send("step")
    return [w.finish() for w in workers]


def ratio(ours: dict, theirs: dict, key: str) -> float | None:
    if ours.get(key) is None or not theirs.get(key):
        return None
    return ours[key] / theirs[key]


def summarise(rows: list[dict]) -> dict:
    by = {(r["side"], r["adapter"], r["optimizer"]): r for r in rows}
    per_setting = {}
    for adapter in ADAPTERS:
        for opt in OPTIMIZERS:
            ours, theirs = by.get(("lmstack", adapter, opt)), by.get(("peft", adapter, opt))
            if ours is None or theirs is None:
                continue
            name = f"{'full' if adapter == 'none' else adapter}/{opt}"
            per_setting[name] = {
                "step_time_vs_peft": ratio(ours, theirs, "step_s"),
                "step_cpu_vs_peft": ratio(ours, theirs, "step_cpu_s"),
                "memory_vs_peft": ratio(ours, theirs, "train_bytes"),
                "allocated_vs_peft": ratio(ours, theirs, "train_allocated_bytes"),
                "peak_rss_vs_peft": ratio(ours, theirs, "peak_rss_bytes"),
            }
    head = per_setting.get("lora/adamw", {})
    mib = 2**20
    memory = [  # predicted and measured side by side, MiB
        {
            "row": f"{r['side']} {r['setting']}/{r['optimizer']}",
            "predicted": round(r["predicted_bytes"] / mib, 1),
            "allocated": round(r["train_allocated_bytes"] / mib, 1),
            "rss": round(r["train_bytes"] / mib, 1),
        }
        for r in rows
        if "predicted_bytes" in r and "train_allocated_bytes" in r
    ]
    spread = {
        key: [min(vals), max(vals)] if (vals := [r[key] for r in rows if key in r]) else None
        for key in ("predicted_vs_allocated", "predicted_vs_measured")
    }
    return {
        "step_time_vs_peft": head.get("step_time_vs_peft"),
        "memory_vs_peft": head.get("memory_vs_peft"),
        "targets": {"step_time_vs_peft": 1.1, "memory_vs_peft": 1.0},
        "per_setting": per_setting,
        "predicted_vs_measured_mib": memory,
        "prediction_ratio_range": spread,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~5M-parameter model and fewer steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 6, quick 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--targets", default="q,k,v,o,gate,up,down", help="our names; peft gets *_proj")
    ap.add_argument(
        "--only", default=None, help="comma list of setting:optimizer, e.g. lora:adamw,full:adamw"
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(json.loads(args.worker))
        return

    shape = SHAPES["quick" if args.quick else "default"]
    steps = args.steps or (3 if args.quick else 6)
    warmup = min(args.warmup, 1) if args.quick else args.warmup
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    settings = [(a, o) for a in ADAPTERS for o in OPTIMIZERS]
    if args.only:
        wanted = {tuple(s.split(":")) for s in args.only.split(",")}
        settings = [(a, o) for a, o in settings if ("full" if a == "none" else a, o) in wanted]
        if len(settings) != len(wanted):
            ap.error(
                f"--only {args.only!r}: use settings full|lora|dora|qlora with optimizers adamw|adamw8bit"
            )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "model"
        # built in a subprocess too, so this driver stays small and never imports torch
        code = (
            "import json,sys; sys.path.insert(0, sys.argv[1]); import finetune as b; "
            "from pathlib import Path; b.make_model_folder(Path(sys.argv[2]), json.loads(sys.argv[3]))"
        )
        subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).parent), str(folder), json.dumps(shape)],
            check=True,
            env=child_env(),
        )
        rows = []
        for i, (adapter, opt) in enumerate(settings):
            jobs = []
            for side in SIDES:
                job = dict(
                    side=side, adapter=adapter, optimizer=opt, folder=str(folder), work=str(work / f"{side}-{i}"),
                    rank=args.rank, dropout=args.dropout, targets=targets, threads=args.threads, steps=steps,
                    warmup=warmup, batch=shape["batch"], seq_len=shape["seq_len"], vocab=shape["vocab_size"],
                )  # fmt: skip
                Path(job["work"]).mkdir(parents=True, exist_ok=True)
                jobs.append(job)
            for row in run_pair(jobs, warmup + steps):
                print(
                    f"# {row['side']} {adapter} {opt}: {row.get('step_s', row.get('error'))}", file=sys.stderr
                )
                rows.append(row)
    model = {k: v for k, v in shape.items() if k not in ("batch", "seq_len")}
    report = {
        "model": {"family": "llama", **model, "random_weights": True},
        "inputs": {
            "batch": shape["batch"],
            "seq_len": shape["seq_len"],
            "rank": args.rank,
            "alpha": 2 * args.rank,
            "dropout": args.dropout,
            "targets": targets,
            "dtype": "fp32",
            "threads": args.threads,
            "warmup_steps": warmup,
            "timed_steps": steps,
            "lr": 1e-4,
        },  # fmt: skip
        "rows": rows,
        **summarise(rows),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
