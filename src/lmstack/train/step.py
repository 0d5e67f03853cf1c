"""One optimizer step, as functions both the trainer and the benchmark call.

A step accumulates gradients over micro-batches until it has seen the whole batch (gradient
accumulation: the mean of the micro-batch means equals the mean over the batch), DDP averaging them
over processes, then clips the global gradient norm; the caller takes the optimizer step once it has
checked the loss is finite. What the loss is comes from the method (method.py): `accumulate_gradients`
takes any `loss(model, batch) -> (objective, metrics)`.

Causal-LM pretraining uses teacher forcing: every position predicts the next token of the real text
(never the model's own output) and the loss is the mean cross-entropy over all positions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.train import distributed as dist_mod
from lmstack.train.distributed import DistInfo
from lmstack.train.method import MetricValue, StepStats, to_device

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MethodLoss = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, MetricValue]]]


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


def next_token_objective(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], loss_fn: LossFn, aux_loss_coef: float = 0.0
) -> tuple[torch.Tensor, dict[str, MetricValue]]:
    """Cross-entropy of `model(x)` against `y`, plus `aux_loss_coef` × the MoE balancing loss when the
    model computed one (Shazeer et al. 2017: keeps the router from sending every token to one expert).
    `train_loss` logs the cross-entropy alone. `model(x)` may return logits or an object with
    `.logits` (a `transformers` model)."""
    x, y = batch
    out = model(x)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    loss = loss_fn(logits, y)
    aux = getattr(dist_mod.unwrap(model), "aux_loss", None) if aux_loss_coef else None
    if aux is not None:
        return loss + aux_loss_coef * aux, {"train_loss": loss.detach(), "aux_loss": aux.detach()}
    return loss, {}


def accumulate_gradients(
    model: nn.Module,
    batches: Iterator[Any],
    optimizer: torch.optim.Optimizer,
    loss: MethodLoss,
    *,
    accum: int = 1,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = 1.0,
    device: torch.device | str = "cpu",
    dist: DistInfo | None = None,
) -> StepStats:
    """Forward and backward of `loss` over `accum` micro-batches, then unscale and clip — everything
    of an optimizer step except `optimizer.step()` itself, which the caller takes once it has checked
    the loss is finite. Logged values are summed on the device and reduced once per step."""
    dist = dist or DistInfo()
    sums: dict[str, torch.Tensor] = {}
    for micro in range(accum):
        batch = to_device(next(batches), device)
        # DDP all-reduces gradients on every backward unless told to wait for the last micro-batch
        sync = model.no_sync() if dist.enabled and micro < accum - 1 else contextlib.nullcontext()
        with sync:
            with autocast():
                objective, metrics = loss(model, batch)
            scaled = objective / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        for name, value in {"train_loss": objective, **metrics}.items():
            value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
            sums[name] = sums[name] + value if name in sums else value
    names = sorted(sums)
    if dist.enabled:  # one all-reduce for every logged value
        total = torch.stack([torch.as_tensor(sums[n], dtype=torch.float64, device=device) for n in names])
        values = dict(zip(names, (dist_mod.all_reduce_sum(total, dist) / (accum * dist.world_size)).tolist()))
    else:
        values = {n: float(sums[n]) / accum for n in names}
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    clip = grad_clip if grad_clip is not None else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    train_loss = values.pop("train_loss")
    return StepStats(train_loss, grad_norm, values.pop("aux_loss", None), values)


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
    """`accumulate_gradients` with the causal-LM objective (`next_token_objective`)."""
    loss_fn = loss_fn or causal_lm_loss()

    def loss(m: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, MetricValue]]:
        return next_token_objective(m, batch, loss_fn, aux_loss_coef)

    return accumulate_gradients(
        model, batches, optimizer, loss, accum=accum, autocast=autocast, scaler=scaler,
        grad_clip=grad_clip, device=device, dist=dist,
    )  # fmt: skip
