"""Serving benchmark: prints one JSON object. `python bench/serve.py [--quick] [--threads N]`.

A fixed concurrent load on loopback — mixed prompt lengths (8-160 words of tinyshakespeare) and output
lengths (16-96 tokens, greedy), streamed through POST /v1/completions — at 1, 4 and 16 clients, each
client taking the next request from a shared list (a bounded count, and a time limit per level).
Reported per level: requests/s, output tokens/s, time to first token and inter-token latency (p50,
p99; measured by the client on the SSE stream).

Both sides serve the SAME weights (a random-weight Llama-shaped model of ~3M parameters with a BPE
tokenizer trained here, saved once with `save_pretrained` under bench/.cache/) as subprocesses with
the same thread count: `lmstack serve`, `transformers serve --continuous-batching` and plain
`transformers serve` (both need fastapi; a side that does not start reports its error). Output tokens
are counted from each stream's usage chunk. `lmstack serve` gets `ignore_eos` so every request runs to
its max_tokens; `transformers` may stop early at EOS, which only lowers its token count.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
if not TEXT.exists():
    TEXT = Path("/work/shared/data/tinyshakespeare.txt")
MODEL = dict(family="llama", vocab_size=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=704,
             max_seq_len=512)  # fmt: skip
LEVELS = (1, 4, 16)


def log(msg: str) -> None:
    print(f"[bench/serve] {msg}", file=sys.stderr, flush=True)


def model_folder() -> Path:
    folder = CACHE / "serve-llama-256d-4l-v512"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch

    from lmstack.config import ModelConfig
    from lmstack.interop.hf import save_pretrained
    from lmstack.model import build_model
    from lmstack.tokenizer import Tokenizer

    tok = Tokenizer.train([TEXT.read_text(encoding="utf-8")[:200_000]], 512, special_tokens=["<|endoftext|>"])
    model = build_model(ModelConfig(**MODEL, eos_id=tok.eos_id), dtype=torch.float32, seed=0)
    save_pretrained(model, folder, tokenizer=tok)
    return folder


def workload(n: int, seed: int = 0) -> list[dict]:
    words = TEXT.read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, length = rng.randrange(len(words) - 200), rng.randint(8, 160)
        out.append({"prompt": " ".join(words[start : start + length]), "max_tokens": rng.randint(16, 96)})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, model: str, proc: subprocess.Popen, timeout_s: float = 180) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            stream_one(port, model, {"prompt": "To be", "max_tokens": 2})
            return True
        except (OSError, http.client.HTTPException, ValueError):
            time.sleep(0.5)
    return False


def stream_one(port: int, model: str, item: dict, extra: dict | None = None) -> dict:
    """One streamed completion; returns its TTFT, inter-token gaps and output token count."""
    body = {"model": model, "prompt": item["prompt"], "max_tokens": item["max_tokens"], "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise ValueError(f"HTTP {response.status}: {response.read()[:200]!r}")
    stamps, tokens = [], None
    for line in response:
        if not line.startswith(b"data: "):
            continue
        if line.strip() == b"data: [DONE]":
            break
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if any(c.get("text") for c in chunk.get("choices", [])):
            stamps.append(time.perf_counter())
    conn.close()
    end = time.perf_counter()
    return {"ttft_s": (stamps[0] if stamps else end) - start,
            "gaps_s": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": tokens if tokens is not None else len(stamps), "seconds": end - start}  # fmt: skip


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)


def run_level(port: int, model: str, clients: int, items: list[dict], limit_s: float, extra: dict) -> dict:
    todo, results, lock = list(items), [], threading.Lock()
    stop_at = time.perf_counter() + limit_s

    def client():
        while time.perf_counter() < stop_at:
            with lock:
                if not todo:
                    return
                item = todo.pop(0)
            result = stream_one(port, model, item, extra)
            with lock:
                results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    gaps = [g for r in results for g in r["gaps_s"]]
    ttfts = [r["ttft_s"] for r in results]
    return {
        "clients": clients, "requests": len(results), "seconds": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 2),
        "output_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
        "ttft_ms_p50": pct(ttfts, 0.5), "ttft_ms_p99": pct(ttfts, 0.99),
        "itl_ms_p50": pct(gaps, 0.5), "itl_ms_p99": pct(gaps, 0.99),
    }  # fmt: skip


def bench_server(name: str, cmd: list[str], env: dict, port: int, model: str, levels, per_level: dict,
                 limit_s: float, extra: dict) -> dict:  # fmt: skip
    log(f"starting {name}: {' '.join(cmd)}")
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        if not wait_ready(port, model, proc):
            err = proc.stderr.read().decode(errors="replace")[-600:] if proc.poll() is not None else "timeout"
            return {"error": f"{name} did not start: {err}"}
        out = {}
        for clients in levels:
            out[str(clients)] = run_level(port, model, clients, per_level[clients], limit_s, extra)
            log(f"{name} {clients} clients: {out[str(clients)]}")
        return out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests per level")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both servers")
    parser.add_argument("--limit-s", type=float, default=120.0, help="time limit per level and server")
    args = parser.parse_args()
    folder = model_folder()
    per_level = {c: workload((4 if args.quick else 8) * max(1, c // 2) + 4, seed=c) for c in LEVELS}
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}  # fmt: skip
    ours_port = free_port()
    ours = bench_server(
        "lmstack serve",
        [sys.executable, "-m", "lmstack", "serve", "--model", str(folder), "--port", str(ours_port),
         "--max-batch", "16", "--kv-blocks", "1024", "--log-level", "warning"],
        env, ours_port, folder.name, LEVELS, per_level, args.limit_s, {"ignore_eos": True},
    )  # fmt: skip
    references = {}
    for name, flags in (("transformers_serve_cb", ["--continuous-batching"]), ("transformers_serve", [])):
        port = free_port()
        cmd = [
            str(Path(sys.executable).with_name("transformers")),
            "serve",
            str(folder),
            "--port",
            str(port),
            *flags,
        ]
        references[name] = bench_server(
            name, cmd, env, port, str(folder), LEVELS, per_level, args.limit_s, {}
        )
    import torch

    ratio = {}
    for name, theirs in references.items():
        for c in LEVELS:
            a, b = ours.get(str(c), {}), theirs.get(str(c), {})
            if a.get("output_tokens_per_s") and b.get("output_tokens_per_s"):
                ratio.setdefault(name, {})[str(c)] = round(
                    a["output_tokens_per_s"] / b["output_tokens_per_s"], 2
                )
    print(json.dumps({
        "model": {**MODEL, "dtype": "float32", "weights": "random, same file for both"},
        "load": {"endpoint": "/v1/completions stream", "prompt_words": [8, 160], "max_tokens": [16, 96],
                 "requests_per_level": {str(c): len(v) for c, v in per_level.items()}, "greedy": True},
        "threads": args.threads, "torch": torch.__version__,
        "lmstack": ours, **references,
        "output_tokens_per_s_ratio_lmstack_over": ratio,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
