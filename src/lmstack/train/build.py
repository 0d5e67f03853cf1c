"""Building a run, step by step, before its first optimizer step: the run folder (with the checks a
resume needs), the data and its batch split, the model (fresh or `init_from`), the method's context,
and the optimizer. `loop.train` calls them in that order; each raises `InputError` for bad input
before the next one does any work.

Resuming with another step budget is refused unless `extend` is set: then the new total is recorded
in train_config.json and the schedule's cosine tail is re-planned from the resume step
(`Schedule.extended`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.atomic import atomic_write_text
from lmstack.errors import InputError
from lmstack.train import checkpoint as ckpt
from lmstack.train.config import TrainConfig
from lmstack.train.distributed import DistInfo
from lmstack.train.method import MethodContext
from lmstack.train.metrics import METRICS_FILE
from lmstack.train.optim import build_optimizer
from lmstack.train.prepare import (
    autocast_for,
    initial_model,
    planned_model_config,
    precision_for,
    prepare_data,
    resolve_run_dir,
)

TRAIN_CONFIG_FILE = "train_config.json"
BUDGET_FIELDS = ("max_steps", "time_budget")  # a resume that changes these needs `extend`


def set_threads(config: TrainConfig, info: DistInfo) -> None:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    elif info.enabled and info.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))


def open_run(config: TrainConfig, info: DistInfo) -> tuple[Path, Path | None]:
    """The run folder (created) and, on resume, its latest checkpoint. A fresh run into a folder that
    holds one, or a resume that changes the step budget without `extend`, is refused before anything
    is written; then the run's config is recorded in train_config.json."""
    name = config.out or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    target = Path(name).expanduser()
    if config.resume:
        check_budget(config, target)
    elif (target / ckpt.LATEST).exists() or (target / METRICS_FILE).exists():
        raise InputError(
            f"{target} already holds a run — pass --resume to continue it, or choose another --out"
        )
    run_dir = resolve_run_dir(config, info)
    latest = ckpt.latest_checkpoint(run_dir) if config.resume else None
    if latest is not None and config.extend:
        step = int(ckpt.read_trainer_state(latest)[0]["step"])
        if config.max_steps <= step:
            raise InputError(
                f"{run_dir} is already at step {step} — extend it to more steps than that (--max-steps > {step})"
            )
    if info.is_main:
        atomic_write_text(run_dir / TRAIN_CONFIG_FILE, config.to_json() + "\n")
    return run_dir, latest


def check_budget(config: TrainConfig, run_dir: Path) -> None:
    """On resume the step budget must be the run's own unless `config.extend` says to train on: a
    different budget would otherwise silently train zero steps, or bend the learning-rate plan."""
    saved_path = run_dir / TRAIN_CONFIG_FILE
    if config.extend or not saved_path.is_file():
        return
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {saved_path} ({exc}) — is {run_dir} a run folder?") from None
    changed = [k for k in BUDGET_FIELDS if saved.get(k) != getattr(config, k)]
    if changed:
        was = ", ".join(f"{k}={saved.get(k)}" for k in changed)
        now = ", ".join(f"{k}={getattr(config, k)}" for k in changed)
        raise InputError(
            f"{run_dir} was started with {was}, not {now} — to train it on, pass --extend with the new total "
            "(--resume --extend --max-steps N: the cosine tail is re-planned from the current step), or resume "
            "with the run's own budget"
        )


@dataclass(frozen=True)
class RunData:
    """The prepared dataset, its tokenizer, and how it is cut into batches."""

    dataset: Any  # lmstack.data.pipeline.DatasetInfo
    tokenizer: Any
    seq_len: int
    micro: int  # sequences per forward pass per process
    accum: int  # micro-batches per optimizer step


def build_data(config: TrainConfig, run_dir: Path, info: DistInfo) -> RunData:
    """The dataset (prepared by the pipeline unless given prepared), its tokenizer and batch split."""
    from lmstack.tokenizer import Tokenizer

    dataset = prepare_data(config, run_dir, info)
    tokenizer = Tokenizer.load(dataset.tokenizer_path)
    if tokenizer.vocab_size != dataset.vocab_size:
        raise InputError(
            f"the dataset's shards use {dataset.vocab_size} ids but its tokenizer has "
            f"{tokenizer.vocab_size} — re-run `lmstack data prepare`"
        )
    micro = config.micro_batch_size or config.batch_size // info.world_size
    seq_len = config.seq_len
    if seq_len is None:
        seq_len = planned_model_config(config).max_seq_len
    return RunData(dataset, tokenizer, seq_len, micro, config.batch_size // (micro * info.world_size))


def build_model(config: TrainConfig, data: RunData, info: DistInfo) -> nn.Module:
    """The model step 0 starts from (a fresh preset or `init_from`), on the run's device."""
    model = initial_model(config, data.tokenizer, info.device)
    if data.tokenizer.vocab_size > model.config.vocab_size:
        raise InputError(
            f"the tokenizer has {data.tokenizer.vocab_size} ids but the model only {model.config.vocab_size} "
            "— give data tokenized for this model"
        )
    model.gradient_checkpointing = config.gradient_checkpointing
    return model


def method_context(config: TrainConfig, run_dir: Path, data: RunData, info: DistInfo) -> MethodContext:
    precision = precision_for(config, info.device)  # checked by `prepare.check_inputs`
    return MethodContext(
        config=config, run_dir=run_dir, device=info.device, dist=info, precision=precision,
        autocast=autocast_for(precision, info.device), tokenizer=data.tokenizer, dataset=data.dataset,
        seq_len=data.seq_len, micro_batch_size=data.micro, accum=data.accum, seed=config.seed,
    )  # fmt: skip


def make_optimizer(config: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients (a method may have frozen the rest)."""
    c = config
    return build_optimizer(
        model, lr=c.lr, weight_decay=c.weight_decay, betas=(c.beta1, c.beta2), eps=c.eps,
        decay_embeddings=c.decay_embeddings, fused=device.type == "cuda" or None,
    )  # fmt: skip
