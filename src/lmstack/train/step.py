"""One optimizer step of causal-LM training, as a function both the trainer and the benchmark call.

Teacher forcing: every position predicts the next token of the real text (never the model's own
output) and the loss is the mean cross-entropy over all positions. A step accumulates gradients over
micro-batches until it has seen the whole batch (seed 001, "gradient accumulation"), DDP averaging
them over processes, then clips the global gradient norm; the caller takes the optimizer step once it
has checked the loss is finite.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.train import distributed as dist_mod
from lmstack.train.distributed import DistInfo

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def causal_lm_loss(label_smoothing: float = 0.0) -> LossFn:
    """Mean next-token cross-entropy (targets already shifted by one), computed in float32."""

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.float().flatten(0, 1),
            targets.flatten(),
            ignore_index=-100,
            label_smoothing=label_smoothing,
        )

    return loss


@dataclass(frozen=True)
class StepStats:
    loss: float  # mean main loss over the global batch
    grad_norm: float  # global norm before clipping
    aux_loss: float | None  # mean MoE balancing loss (None for dense models)


def train_step(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    accum: int = 1,
    loss_fn: LossFn | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = 1.0,
    aux_loss_coef: float = 0.0,
    device: torch.device | str = "cpu",
    dist: DistInfo | None = None,
) -> StepStats:
    """Forward and backward over `accum` micro-batches, then unscale and clip — everything of an
    optimizer step except `optimizer.step()` itself, which the caller takes once it has checked the
    loss is finite. `model(x)` may return logits or an object with `.logits` (a `transformers` model)."""
    dist = dist or DistInfo()
    loss_fn = loss_fn or causal_lm_loss()
    inner = dist_mod.unwrap(model)
    total = torch.zeros(
        2, dtype=torch.float64, device=device
    )  # summed main and aux loss; no host sync per micro-batch
    has_aux = False
    for micro in range(accum):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # DDP all-reduces gradients on every backward unless told to wait for the last micro-batch
        sync = model.no_sync() if dist.enabled and micro < accum - 1 else contextlib.nullcontext()
        with sync:
            with autocast():
                out = model(x)
                logits = out if isinstance(out, torch.Tensor) else out.logits
                loss = loss_fn(logits, y)
                full = loss
                aux = getattr(inner, "aux_loss", None)
                if aux is not None and aux_loss_coef:
                    full = loss + aux_loss_coef * aux
                    total[1] += aux.detach().double()
                    has_aux = True
            scaled = full / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total[0] += loss.detach().double()
    total = dist_mod.all_reduce_sum(total, dist) / (accum * dist.world_size)
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    clip = grad_clip if grad_clip is not None else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    return StepStats(float(total[0]), grad_norm, float(total[1]) if has_aux else None)
