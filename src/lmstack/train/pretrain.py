"""Pretraining, the first `Method`: next-token cross-entropy on shuffled windows of the token shard.

Batches come from `TokenBatches`: one loader call yields one micro-batch of every process (a global
micro-batch), so the examples of step k are stream items [k·batch_size, (k+1)·batch_size) however they
are split over processes and micro-batches. The data position (one counter) is the method's state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lmstack.errors import InputError
from lmstack.train.method import Method, MethodContext, MetricValue
from lmstack.train.step import LossFn, causal_lm_loss, next_token_objective


class Pretraining(Method):
    """Causal-LM training of every parameter; `label_smoothing` comes from the run's config."""

    name = "pretrain"

    def __init__(self, loss_fn: LossFn | None = None) -> None:
        """`loss_fn(logits (B, T, V), targets (B, T)) -> scalar` replaces the cross-entropy."""
        self.given_loss_fn = loss_fn
        self.loss_fn: LossFn = loss_fn or causal_lm_loss()
        self.aux_loss_coef = 0.0
        self.loader: Any = None

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        self.loss_fn = self.given_loss_fn or causal_lm_loss(ctx.config.label_smoothing)
        self.aux_loss_coef = model.config.router_aux_loss_coef
        return model

    def batches(self, ctx: MethodContext) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from lmstack.data.loader import TokenBatches

        c = ctx.config
        self.loader = TokenBatches(
            ctx.dataset.train_path, ctx.global_micro_batch_size, ctx.seq_len, seed=c.seed,
            rank=ctx.dist.rank, world_size=ctx.dist.world_size,
        )  # fmt: skip
        if self.loader.n_windows < c.batch_size:
            raise InputError(
                f"corpus smaller than one batch: the training split holds {self.loader.n_windows} sequences of "
                f"{ctx.seq_len} tokens, one step needs batch_size={c.batch_size} — give more text, or lower "
                "batch_size or seq_len"
            )
        return self.loader

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, MetricValue]]:
        return next_token_objective(model, batch, self.loss_fn, self.aux_loss_coef)

    def log(self) -> dict[str, float]:
        return {"epoch": round(self.loader.epoch, 4)}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"data_position": self.loader.state_dict()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["data_position"])
