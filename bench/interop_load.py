"""Load a Hugging Face Llama checkpoint with lmstack and with transformers, side by side; print one JSON.

Each side runs in its own process so peak memory is its own: load time, peak RSS growth over the
load and over load + one forward (the meta-device build means about one copy of the weights; pages
mapped from the safetensors file count only once touched), forward time on the same batch, and the
largest logit difference between the two. Then the save path: lmstack's `save_pretrained`
against transformers' on the same weights.

    python bench/interop_load.py [--layers 12] [--d-model 1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mib() -> float:
    # VmHWM (Linux): this process's own high-water mark; ru_maxrss would carry the parent's across exec
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("needs Linux /proc")


def worker(side: str, folder: str, out: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if side == "lmstack":
        from lmstack.interop.hf import from_pretrained, save_pretrained

        load = lambda: from_pretrained(folder)  # noqa: E731
        save = lambda m, p: save_pretrained(m, p)  # noqa: E731
        call = lambda m, ids: m(ids)  # noqa: E731
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        load = lambda: transformers.AutoModelForCausalLM.from_pretrained(folder).eval()  # noqa: E731
        save = lambda m, p: m.save_pretrained(p)  # noqa: E731
        call = lambda m, ids: m(ids).logits  # noqa: E731
    base = _peak_rss_mib()
    t0 = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - t0
    peak = _peak_rss_mib() - base
    ids = torch.randint(0, 32000, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        call(model, ids)  # warm-up
        t0 = time.perf_counter()
        logits = call(model, ids)
        forward_s = time.perf_counter() - t0
    peak_after_forward = _peak_rss_mib() - base  # weights mapped lazily from the file count once touched
    torch.save(logits, Path(out) / f"{side}.pt")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        save(model, Path(tmp) / "saved")
        save_s = time.perf_counter() - t0
    print(
        json.dumps(
            dict(
                load_s=load_s, load_peak_rss_mib=peak, forward_s=forward_s,
                peak_rss_after_forward_mib=peak_after_forward, save_s=save_s,
            )
        )
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, threads=args.threads)
        return

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=args.d_model, intermediate_size=int(2.75 * args.d_model),
        num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4, initializer_range=0.05,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        n_params = model.num_parameters()
        model.save_pretrained(Path(tmp) / "hf")
        del model
        results = {}
        for side in ("lmstack", "transformers"):
            cmd = [
                sys.executable,
                __file__,
                "--threads",
                str(args.threads),
                "--worker",
                side,
                str(Path(tmp) / "hf"),
                tmp,
            ]
            results[side] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        diff = (
            (torch.load(Path(tmp) / "lmstack.pt") - torch.load(Path(tmp) / "transformers.pt"))
            .abs()
            .max()
            .item()
        )
    print(
        json.dumps(
            dict(
                model=f"llama d={args.d_model} layers={args.layers} vocab=32000 (GQA 16/4)",
                params=n_params,
                weights_mib=round(n_params * 4 / 2**20, 1),
                threads=args.threads,
                torch=torch.__version__,
                transformers=transformers.__version__,
                max_abs_logit_diff=diff,
                **{f"{side}_{k}": round(v, 3) for side, r in results.items() for k, v in r.items()},
            )
        )
    )


if __name__ == "__main__":
    main()
