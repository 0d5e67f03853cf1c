"""Supervised fine-tuning (SFT), a `Method` of the one training loop.

The model learns to continue a conversation with the assistant's reply: cross-entropy of the next
token, averaged over the tokens an assistant wrote (labels; see data.py), everything else ignored.
The data is a JSONL file of conversations; a held-out part (or a given validation file) gives the
validation loss. Batches are drawn from a seeded permutation of the examples, epoch after epoch; the
position in it (epoch, cursor) is the method's checkpointed state, so a resumed run sees the same
batches. With an adapter setup, only the adapters train (adapters.py).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import InputError
from lmstack.finetune.adapters import AdapterSetup
from lmstack.finetune.data import (
    IGNORE,
    ExampleStats,
    pack_rows,
    packed_batch,
    pad_batch,
    read_records,
    sft_examples,
)
from lmstack.train.method import Method, MethodContext, MetricValue, check_frozen_model


@dataclass(frozen=True)
class FinetuneData:
    """The stand-in for a pretraining `DatasetInfo` that a fine-tuning method hands the loop."""

    version: str
    tokenizer_path: Path
    vocab_size: int
    train_tokens: int
    val_tokens: int
    stats: ExampleStats


def split_validation(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, val): a seeded `fraction` of the items (at least one) held out for validation."""
    if len(items) < 2:
        raise InputError(f"{len(items)} usable example(s) — fine-tuning needs at least 2 (one held out)")
    n_val = max(1, round(fraction * len(items)))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def file_digest(*paths: str | Path | None) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path is not None:
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()


class ExampleStream:
    """Endless micro-batches of this process's share of a seeded permutation of the examples, epoch
    after epoch. State: (epoch, cursor into the permutation), restored exactly."""

    def __init__(
        self, items: list[Any], per_batch: int, seed: int, collate: Any, *, rank: int = 0, world_size: int = 1
    ) -> None:
        self.items, self.per_batch, self.seed, self.collate = items, per_batch, seed, collate
        self.rank, self.world_size = rank, world_size
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        return torch.randperm(
            len(self.items), generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()

    def __iter__(self) -> ExampleStream:
        return self

    def __next__(self) -> Any:
        """The next global micro-batch's items (per_batch × world_size of them); this rank's slice."""
        need = self.per_batch * self.world_size
        chosen = []
        while len(chosen) < need:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            chosen.append(self.items[self._order[self.cursor]])
            self.cursor += 1
        return self.collate(chosen[self.rank :: self.world_size])

    @property
    def epochs(self) -> float:
        return self.epoch + self.cursor / len(self.items)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "items": len(self.items)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["items"] != len(self.items):
            raise InputError(
                f"the run was trained on {state['items']} items, this data gives {len(self.items)} — resume "
                "with the run's own data and settings"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation()


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token cross-entropy over labelled tokens, their count) of a padded or packed batch
    (a packed one carries `segments`, its document mask)."""
    packed = {"segments": batch["segments"]} if "segments" in batch else {}
    logits = model(batch["ids"], positions=batch["positions"], attention_mask=batch["mask"], **packed)
    # position t predicts label t+1; the last position has none (IGNORE). Shifting the labels rather
    # than slicing the logits keeps the (B, T, vocab) logits a view: `logits[:, :-1]` flattened is a
    # full copy in the forward, and its backward another zero-filled one, the step's largest tensors
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    return loss, (targets != IGNORE).sum()


class SFT(Method):
    """Supervised fine-tuning on chat JSONL; see the module docstring."""

    name = "sft"
    loss_is_nll = True  # the validation loss is a mean token NLL, so its perplexity is reported

    def __init__(
        self,
        data: str | Path,
        *,
        tokenizer_path: str | Path,
        val_data: str | Path | None = None,
        val_fraction: float = 0.1,
        truncate: str = "drop",
        packing: bool = False,
        adapters: AdapterSetup | None = None,
        base: dict[str, str] | None = None,
    ) -> None:
        self.data_path, self.val_path = Path(data), None if val_data is None else Path(val_data)
        self.tokenizer_path = Path(tokenizer_path)
        self.val_fraction, self.truncate, self.packing = val_fraction, truncate, packing
        self.adapters = adapters or AdapterSetup()
        self.base = base  # {"path", "sha256"} of the starting model, checked on resume
        self.stream: ExampleStream | None = None
        self.info: FinetuneData | None = None

    # ---- data -------------------------------------------------------------------------------------
    def dataset(self, config: Any, run_dir: Path, dist: Any) -> FinetuneData:
        from lmstack.tokenizer import Tokenizer

        seq_len = config.seq_len
        if seq_len is None:
            from lmstack.train.prepare import planned_model_config

            seq_len = planned_model_config(config).max_seq_len
        if self.info is not None and self.seq_len == seq_len:
            return self.info  # read once: `finetune` counts the steps of an epoch before training
        self.seq_len = seq_len
        tokenizer = Tokenizer.load(self.tokenizer_path)
        examples, stats = self.examples(tokenizer, self.data_path, seq_len)
        if self.val_path is not None:
            self.val, val_stats = self.examples(tokenizer, self.val_path, seq_len)
            if not self.val:
                raise InputError(f"{self.val_path} gives no usable example ({val_stats.summary()})")
            self.train = examples
            if not self.train:
                raise InputError(f"{self.data_path} gives no usable example ({stats.summary()})")
        else:
            self.train, self.val = split_validation(examples, self.val_fraction, config.seed)
        self.stats = stats
        version = file_digest(self.data_path, self.val_path)[:16]
        self.info = FinetuneData(
            version=version, tokenizer_path=self.tokenizer_path, vocab_size=tokenizer.vocab_size,
            train_tokens=sum(map(self.tokens, self.train)), val_tokens=sum(map(self.tokens, self.val)),
            stats=stats,
        )  # fmt: skip
        return self.info

    def examples(self, tokenizer: Any, path: Path, seq_len: int) -> tuple[list[Any], ExampleStats]:
        """The file's records as training items (here: `Example`s), and what happened to them."""
        return sft_examples(tokenizer, read_records(path), seq_len, self.truncate)

    @staticmethod
    def tokens(item: Any) -> int:
        return len(item.ids)

    def collate(self, items: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
        """A micro-batch of training items (or packed rows)."""
        return packed_batch(items, self.seq_len, pad_id) if self.packing else pad_batch(items, pad_id)

    def validation_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """(mean loss, weight, other means) of one validation batch; validation reports the weighted
        means over all batches."""
        loss, n = sft_loss(model, batch)
        return loss, int(n), {}

    def val_batch(self, items: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
        return pad_batch(items, pad_id)

    def train_items(self) -> list[Any]:
        """What one epoch draws: the training examples, or the packed rows they fill."""
        return pack_rows(self.train, self.seq_len) if self.packing else self.train

    def batches(self, ctx: MethodContext) -> Iterator[dict[str, torch.Tensor]]:
        pad = ctx.tokenizer.eos_id or 0
        self.stream = ExampleStream(
            self.train_items(), ctx.micro_batch_size, ctx.seed, lambda chosen: self.collate(chosen, pad),
            rank=ctx.dist.rank, world_size=ctx.dist.world_size,
        )  # fmt: skip
        return self.stream

    # ---- the model ---------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        self._model = self.adapters.prepare(model, ctx.seed)
        return self._model

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, MetricValue]]:
        loss, count = sft_loss(model, batch)
        return loss, {"target_tokens": count.detach().double()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: MethodContext, max_batches: int | None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        total, count, sums = torch.zeros((), dtype=torch.float64), 0, {}
        size = ctx.micro_batch_size
        chunks = [self.val[i : i + size] for i in range(0, len(self.val), size)]
        for chunk in chunks[:max_batches] if max_batches else chunks:
            batch = {k: v.to(ctx.device) for k, v in self.val_batch(chunk, ctx.tokenizer.eos_id or 0).items()}
            with ctx.autocast():
                loss, n, metrics = self.validation_loss(model, batch)
            total += loss.double().cpu() * n
            count += n
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
        model.train(was_training)
        val = float(total / max(count, 1))
        means = {f"val_{k}": v / max(count, 1) for k, v in sums.items()}
        if self.loss_is_nll:
            means["val_ppl"] = math.exp(min(val, 700.0))
        return {"val_loss": val, "val_scored": count, **means}

    # ---- checkpoints --------------------------------------------------------------------------------
    def checkpoint_model(self, model: nn.Module) -> nn.Module:
        return self.adapters.checkpoint_model(model)

    def save_files(self, folder: Path) -> None:
        self.adapters.save_files(self._model, folder)

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        self.adapters.load_weights(model, folder)

    def log(self) -> dict[str, float]:
        return {"epoch": round(self.stream.epochs, 4)}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"data_position": self.stream.state_dict(), "base": self.base, "packing": self.packing}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        if state.get("base") and self.base:
            check_frozen_model(state["base"], self.base, role="base")
        if state.get("packing") != self.packing:
            raise InputError("the run was trained with another --packing setting — resume with the same one")
        self.stream.load_state_dict(state["data_position"])
