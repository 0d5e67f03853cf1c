"""Validation loss during training, and `lmstack eval`: sliding-window perplexity and bits per byte.

Perplexity = exp(mean cross-entropy in nats per token): how many equally likely tokens
the model is choosing between. It depends on the tokenizer, so models with different vocabularies
are compared in bits per byte instead: total loss in bits over the UTF-8 bytes of the text,
bpb = Σ nll / (ln 2 · bytes) = mean_loss · tokens / (ln 2 · bytes).

A text longer than the model's context is scored with a sliding window (the `transformers`
perplexity guide): windows of `seq_len` tokens start every `stride` tokens, and each scores only the
tokens no earlier window scored, so every token is predicted once with at least seq_len − stride
tokens of context (except at the start). stride = seq_len gives disjoint windows (fast, less context).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.data.loader import eval_batches
from lmstack.errors import InputError
from lmstack.textfile import read_text_file
from lmstack.train.distributed import DistInfo, all_reduce_sum


@torch.no_grad()
def shard_loss(
    model: nn.Module,
    shard: Path,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None,
    device: torch.device,
    autocast: Any = contextlib.nullcontext,
    dist: DistInfo | None = None,
) -> tuple[float, int]:
    """(summed nll in nats, tokens scored) over consecutive windows of a token shard, all processes together."""
    dist = dist or DistInfo()
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for x, y in eval_batches(
        shard, batch_size, seq_len, max_batches, rank=dist.rank, world_size=dist.world_size
    ):
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(x)
        total[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double().cpu()
        total[1] += y.numel()
    model.train(was_training)
    total = all_reduce_sum(total, dist)
    return float(total[0]), int(total[1])


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    return nll_nats / (math.log(2) * n_bytes)


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean nats per scored token
    perplexity: float
    bits_per_byte: float
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text
    seq_len: int
    stride: int
    model: str
    data: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sliding_windows(n_targets: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first_scored) over targets 0..n_targets-1: window inputs are tokens [begin, end),
    predicting targets [begin, end); targets from `first_scored` on are new in this window."""
    if stride < 1 or stride > seq_len:
        raise InputError(f"stride {stride} must lie in 1..{seq_len} (the window length) — lower --stride")
    scored, begin = 0, 0
    while scored < n_targets:
        end = min(begin + seq_len, n_targets)
        yield begin, end, scored
        scored = end
        begin += stride


@torch.no_grad()
def sliding_window_nll(
    model: nn.Module,
    ids: list[int],
    *,
    seq_len: int,
    stride: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> tuple[float, int]:
    """(summed nll in nats, tokens scored) predicting ids[1:] from what precedes them."""
    tokens = torch.tensor(ids, dtype=torch.long)
    n_targets = len(ids) - 1
    if n_targets < 1:
        raise InputError("the text is too short to score: it needs at least 2 tokens — give more text")
    model.eval()
    windows = list(sliding_windows(n_targets, seq_len, stride))
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        group = windows[start : start + batch_size]
        lengths = {e - b for b, e, _ in group}
        for length in sorted(lengths):  # only the last window may be shorter; batch equal lengths
            same = [w for w in group if w[1] - w[0] == length]
            x = torch.stack([tokens[b:e] for b, e, _ in same]).to(device)  # (B, T)
            y = torch.stack([tokens[b + 1 : e + 1] for b, e, _ in same]).to(device)
            logits = model(x).float()  # (B, T, V)
            nll = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T)
            for row, (b, _, first) in enumerate(same):
                total += float(nll[row, first - b :].double().sum())
                count += nll.shape[1] - (first - b)
    return total, count


def evaluate(
    model: str | Path,
    data: str | Path,
    *,
    stride: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
) -> EvalResult:
    """Perplexity and bits per byte of a checkpoint (or a run folder's latest) on a UTF-8 text file.

    The text is encoded with the checkpoint's tokenizer, preceded by its end-of-text token as in
    training (so the first token is predicted too and bits per byte cover every byte). `seq_len`
    defaults to the model's context and `stride` to half of it.
    """
    from lmstack.interop.folders import load_model_and_tokenizer, resolve_model_dir
    from lmstack.train.distributed import resolve_device

    model_dir = resolve_model_dir(model)
    text = _read_text(Path(data))
    dev = resolve_device(device)
    net, tok = load_model_and_tokenizer(model_dir)
    net = net.to(dev)
    context = net.config.max_seq_len
    seq_len = seq_len or context
    if seq_len > context:
        raise InputError(
            f"--seq-len {seq_len} is longer than the model's context {context} — use at most {context}"
        )
    stride = stride or max(1, seq_len // 2)
    ids = ([tok.eos_id] if tok.eos_id is not None else []) + tok.encode_ordinary(text)
    nll, count = sliding_window_nll(
        net, ids, seq_len=seq_len, stride=stride, batch_size=batch_size, device=dev
    )
    loss = nll / count
    return EvalResult(
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=bits_per_byte(nll, len(text.encode("utf-8"))),
        tokens=count,
        bytes=len(text.encode("utf-8")),
        seq_len=seq_len,
        stride=stride,
        model=str(model_dir),
        data=str(data),
    )


def _read_text(path: Path) -> str:
    return read_text_file(path, what="data file")
