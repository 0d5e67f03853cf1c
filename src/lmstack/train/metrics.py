"""What a run reports: `metrics.jsonl`, the loss and learning-rate plots, and throughput (tokens/s, MFU).

`metrics.jsonl` holds one JSON object per optimizer step (`step`, `train_loss`, `lr`, `tokens_per_s`,
`mfu`, ... and `val_loss`, `val_ppl`, `val_bpb` on the steps that evaluated); step 0 records the
untrained model's validation loss. Lines are appended and flushed as they come; on resume the file
is cut back to the checkpoint's step so it reads as one uninterrupted run.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOP/s ÷ peak FLOP/s. Model FLOPs
per trained token are 3× the forward pass (forward + backward for activations and weights), with
attention counted at full s² as the PaLM convention does; recomputation from activation
checkpointing is not counted (that would be hardware FLOPs utilisation).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from lmstack.atomic import atomic_write_text
from lmstack.config import ModelConfig

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Append-only JSON-lines log, one record per step."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def truncate(self, step: int) -> None:
        """Keep only complete records with `step` <= the given step (a crash may leave a partial line)."""
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def plot_curves(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """`loss.png` (train and validation loss by step) and `lr.png` (learning rate by step)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set here, never at import time of lmstack
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    lrs = [(r["step"], r["lr"]) for r in records if r.get("lr") is not None]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(Path(out_dir) / "loss.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3))
    if lrs:
        ax.plot(*zip(*lrs))
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(Path(out_dir) / "lr.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def training_flops_per_token(config: ModelConfig, seq_len: int) -> tuple[float, str]:
    """Model FLOPs to train on one token at context `seq_len`, and where the number came from."""
    try:
        from lmstack.arith.flops import training_flops_exact

        return float(
            training_flops_exact(config, seq_len, 1, causal=False)
        ), "lmstack.arith.flops.training_flops_exact"
    except ImportError:
        pass
    # Fallback (no arithmetic module): 6·N for the matmul weights a token meets, plus the attention
    # scores and weighted sums, 2 × 2·n_heads·head_dim·seq_len per layer forward, ×3 for training.
    c = config
    experts = c.n_experts_per_token if c.is_moe else 1
    per_layer = c.d_model * (c.q_dim + 2 * c.kv_dim) + c.q_dim * c.d_model
    per_layer += experts * (3 if c.gated_mlp else 2) * c.d_model * c.d_ff + (
        c.d_model * c.n_experts if c.is_moe else 0
    )
    weights = c.n_layers * per_layer + c.d_model * c.vocab_size
    attention = c.n_layers * 4 * c.n_heads * c.head_dim * seq_len
    return 6.0 * weights + 3.0 * attention, "6·N + attention, computed locally (lmstack.arith missing)"


def measure_peak_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.5
) -> float:
    """Matmul FLOP/s this process reaches on `device` in `dtype`: the 'measured peak' MFU divides by.

    A square matmul large enough to be compute-bound, timed after a warm-up call; the best of the
    timed repeats. It is what the hardware gives this process now, not the datasheet; on a shared
    machine a busy moment lowers it, so the trainer re-measures at each evaluation and keeps the best.
    """
    n = 4096 if device.type == "cuda" else 2048
    gen = torch.Generator(device=device).manual_seed(0)  # never the global generator: it drives dropout
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    _sync(device)
    torch.matmul(a, b)
    _sync(device)
    best = math.inf
    deadline = time.perf_counter() + seconds
    repeats = 0
    while time.perf_counter() < deadline or repeats < 3:
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
        repeats += 1
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
