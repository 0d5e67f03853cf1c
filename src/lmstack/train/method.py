"""`Method`: what a training method changes, plugged into the one training loop.

The loop (loop.py) owns everything every method shares: the run folder, the optimizer and its
schedule, gradient accumulation over micro-batches, DDP, clipping, the NaN guard, evaluation,
checkpoints, exact resume, metrics.jsonl and the plots. A method says only what differs:

    prepare(model, ctx) -> model        freeze weights, inject adapters, load a frozen reference, ...
    batches(ctx) -> iterator            the micro-batches to train on (this process's share)
    loss(model, batch) -> (loss, metrics)
    state_dict() / load_state_dict()    what the method itself must checkpoint (data position,
                                        extra heads, counters), as tensors + JSON — never pickle
    step(model, optimizer, batches, ctx)  optional: the whole update, for methods that need rollouts
                                        or several inner epochs (PPO)
    dataset(config, run_dir, info)      optional: the method's own data (e.g. chat JSONL) instead of the
                                        pretraining pipeline's token shards
    evaluate(model, ctx, max_batches)   optional: the method's own validation metrics
    checkpoint_model(model) / save_files(folder) / load_weights(model, folder)
                                        optional: what a checkpoint's weights are (e.g. adapters merged
                                        into a copy), extra files in it (a PEFT adapter folder), and how a
                                        resume restores the trained weights from it

Only parameters with `requires_grad` reach the optimizer, so freezing in `prepare` is all a method
does to train a subset (LoRA). Checkpoints still save the whole model. A frozen reference model is
not copied into checkpoints: the method records its path and content hash in `state_dict` and
refuses, in `load_state_dict`, to resume against a different one.

Pretraining (pretrain.py) is the first method: next-token loss on `TokenBatches`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.errors import InputError
from lmstack.train.config import TrainConfig
from lmstack.train.distributed import DistInfo

MetricValue = torch.Tensor | float


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step logged (`step.accumulate_gradients` makes it)."""

    loss: float  # mean `train_loss` over the global batch
    grad_norm: float  # global norm before clipping
    aux_loss: float | None = None  # mean MoE balancing loss (None for dense models)
    metrics: dict[str, float] = field(default_factory=dict)  # every other value the method logged


@dataclass(frozen=True)
class MethodContext:
    """What a method may need to know about the run it is part of."""

    config: TrainConfig
    run_dir: Path
    device: torch.device
    dist: DistInfo
    precision: str  # "fp32", "bf16" or "fp16" (autocast around `loss`)
    autocast: Callable[[], Any]  # the context manager the loop runs `loss` under
    tokenizer: Any  # lmstack.tokenizer.Tokenizer
    dataset: Any  # lmstack.data.pipeline.DatasetInfo: train/val shards, tokenizer path, sizes
    seq_len: int
    micro_batch_size: int  # sequences per forward pass on this process
    accum: int  # micro-batches per optimizer step
    seed: int

    @property
    def global_micro_batch_size(self) -> int:
        """Sequences in one micro-batch of every process together."""
        return self.micro_batch_size * self.dist.world_size


class Method:
    """Base class of training methods; subclasses override `batches` and `loss`, and whatever else
    they change. The loop calls, in order: `prepare` once, `batches` once, then per optimizer step
    `accum` × `loss` (or one `step`), and `state_dict` at each checkpoint; `load_state_dict` once on
    resume, after `prepare` and `batches`."""

    name: str = "method"  # recorded in checkpoints: a resume with another method is refused

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Change the model before training (freeze, inject adapters, add heads) and return it. The
        default trains every parameter of the model as it is."""
        return model

    def batches(self, ctx: MethodContext) -> Iterator[Any]:
        """An endless iterator of micro-batches for this process. Tensors in a batch (also inside
        tuples, lists and dicts) are moved to the device by the loop."""
        raise NotImplementedError(
            f"{type(self).__name__} must define batches(ctx) — every Method supplies its data"
        )

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, MetricValue]]:
        """The scalar objective to minimise on one micro-batch, and named values to log. Metrics are
        averaged over micro-batches and processes and written to metrics.jsonl; `train_loss` defaults
        to the objective. Return detached 0-d tensors rather than floats: the loop converts them once
        per step, so logging costs no host synchronisation per micro-batch."""
        raise NotImplementedError(
            f"{type(self).__name__} must define loss(model, batch), or override step() to update without it"
        )

    def step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[Any], ctx: MethodContext
    ) -> StepStats | None:
        """Override to take the whole optimizer step yourself (rollouts, several inner epochs): update
        the weights (`optimizer.step()`, as many times as the method needs; `step.accumulate_gradients`
        does the forward/backward part) and return its `StepStats`. The learning rate is already set for this step. The default
        returns None: the loop accumulates `loss` over `ctx.accum` micro-batches, clips and steps."""
        return None

    def dataset(self, config: TrainConfig, run_dir: Path, dist: DistInfo) -> Any | None:
        """The method's own data, or None (the default) for the pretraining pipeline's prepared token
        shards. What it returns stands in for `DatasetInfo`: `version`, `tokenizer_path`, `vocab_size`,
        `train_tokens`, `val_tokens`; a method that returns one also overrides `evaluate`."""
        return None

    def evaluate(
        self, model: nn.Module, ctx: MethodContext, max_batches: int | None
    ) -> dict[str, float] | None:
        """Validation metrics (`val_loss` at least) on at most `max_batches` batches (None: all), or None
        (the default) for the loop's next-token loss on the validation token shard."""
        return None

    def checkpoint_model(self, model: nn.Module) -> nn.Module:
        """The model whose weights a checkpoint stores (default: the trained model itself)."""
        return model

    def save_files(self, folder: Path) -> None:
        """Write extra files into a checkpoint folder while it is being written (before it is hashed
        and renamed into place, so they are as atomic as the weights)."""

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        """Restore the trained weights from checkpoint `folder` on resume (default: its model weights)."""
        from lmstack.train.checkpoint import load_model_weights

        load_model_weights(model, folder)

    def log(self) -> dict[str, float]:
        """Extra values for this step's metrics line that are not averaged (e.g. the data epoch)."""
        return {}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What the method must checkpoint beyond the model and optimizer: named tensors (saved as
        safetensors) and JSON-able values. Under DDP the main process's state is saved and every
        process loads it on resume, so keep it the same on every process."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; raise `InputError` when it does not fit this run."""


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor in it (also in nested tuples, lists, dicts) moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple):
        return tuple(to_device(b, device) for b in batch)
    if isinstance(batch, list):
        return [to_device(b, device) for b in batch]
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def load_frozen_model(spec: str | Path, device: torch.device) -> tuple[nn.Module, dict[str, str]]:
    """A frozen model (a reference for a KL penalty, a teacher) from a checkpoint or run folder, in
    eval mode without gradients, and its record for the method's state: the resolved folder and the
    SHA-256 of its weights. Checkpoints store this record, never a copy of the weights."""
    from lmstack.interop.folders import load_model_and_tokenizer, resolve_model_dir
    from lmstack.train.checkpoint import weights_hash

    folder = resolve_model_dir(spec)
    model, _ = load_model_and_tokenizer(folder, dtype=torch.float32)
    model = model.to(device).eval().requires_grad_(False)
    return model, {"path": str(folder), "sha256": weights_hash(folder)}


def check_frozen_model(saved: dict[str, str], current: dict[str, str], role: str = "reference") -> None:
    """Refuse to resume against another frozen model than the run was trained with."""
    if saved.get("sha256") != current["sha256"]:
        raise InputError(
            f"the {role} model has changed since the checkpoint: it was {saved.get('path')} with weights "
            f"{str(saved.get('sha256'))[:12]}…, now {current['path']} has {current['sha256'][:12]}… — resume with "
            f"the original {role} weights, or start a new run with another --out"
        )
