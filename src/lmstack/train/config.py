"""`TrainConfig`: every knob of a training run in one frozen dataclass.

A YAML or JSON file (`lmstack train --config FILE`) maps onto it key by key; command-line flags then
override single fields (`dataclasses.replace`, which re-runs validation). Two fields are nested
mappings handed to the layers below: `model` overrides fields of the preset's `ModelConfig`, and
`data_config` fields of the data pipeline's `DataConfig`:

```yaml
preset: tiny
model: {n_layers: 2, dropout: 0.1}
data: [corpus/]
data_config: {val_fraction: 0.1}
batch_size: 32
lr: 3.0e-3
max_steps: 500
```

The run length is either `max_steps`, or a `time_budget` in minutes (the default, 10 minutes, when
neither is given): then the total number of steps is estimated once warmup has been timed and stored
in the trainer state, so a resumed run keeps the same learning-rate schedule.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.errors import InputError
from lmstack.textfile import read_settings_file

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
DEFAULT_TIME_BUDGET_MIN = 10.0


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Batch sizes count sequences of `seq_len` tokens."""

    # the model: a preset, with `model` overriding its fields (vocab_size and eos_id come from the tokenizer)
    preset: str = "small"
    model: dict[str, Any] = field(default_factory=dict)
    # start from trained weights instead of a fresh preset: a checkpoint folder, a run folder (its latest
    # checkpoint) or a Hugging Face folder; the model config and tokenizer then come from it
    init_from: str | None = None
    # the data: raw text files/folders, or one prepared dataset folder; empty = the embedded default corpus
    data: tuple[str, ...] = ()
    tokenizer: str | None = None  # reuse this tokenizer folder instead of training one
    vocab_size: int = 4096  # of the tokenizer trained on the data (256 bytes + merges + <|endoftext|>)
    data_config: dict[str, Any] = field(default_factory=dict)  # `lmstack.data.DataConfig` fields
    corpus_max_chars: int | None = None  # use only the first N characters of the default corpus (smoke tests)
    # where to write the run folder (default runs/<timestamp>)
    out: str | None = None
    resume: bool = False
    extend: bool = False  # with resume: train on to a new max_steps (the cosine tail is re-planned)
    # how long
    max_steps: int | None = None
    time_budget: float | None = None  # minutes of wall-clock time; total steps estimated after warmup
    # batches: batch_size sequences per optimizer step, over all processes, accumulated from micro-batches
    seq_len: int | None = None  # None = the model's max_seq_len
    batch_size: int = 16
    micro_batch_size: int | None = None  # sequences per forward pass per process; None = no accumulation
    # optimiser (AdamW with decoupled weight decay) and schedule (linear warmup, cosine decay to a floor)
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    decay_embeddings: bool = False  # norms and biases never decay; embeddings only when this is set
    optimizer: str = "adamw"  # or "adamw8bit": moments stored block-wise in 8 bits (train/optim8bit.py)
    grad_clip: float | None = 1.0  # max global gradient norm; None = no clipping
    # regularisation
    dropout: float | None = None  # None = the preset's dropout
    label_smoothing: float = 0.0
    # numerics and speed
    precision: str = "auto"  # auto: fp32 on CPU, bf16 autocast on GPU; fp16 uses a gradient scaler
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the training forward
    attn_impl: str = "sdpa"
    device: str = "auto"  # auto: cuda when available, else cpu
    threads: int | None = None  # torch CPU threads per process; None = torch's default (cores / processes)
    seed: int = 0
    # evaluation, checkpoints, logging
    eval_interval: int = 100  # steps between validation passes (one also runs at step 0 and at the end)
    eval_batches: int | None = 20  # batches per interval evaluation (the final one reads all of val)
    checkpoint_interval: int = 250  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # older ones are deleted once a newer one is complete
    peak_flops: float | None = None  # FLOP/s per process for MFU; None = measured with a matmul at start
    progress: bool = True  # a tqdm bar on the main process
    sample_prompt: str = "The"
    sample_tokens: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            object.__setattr__(self, "data", (str(self.data),))
        object.__setattr__(self, "data", tuple(str(p) for p in self.data))
        for name in ("model", "data_config"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, {})
            elif not isinstance(value, dict):
                _bad(
                    name,
                    f"must be a mapping of field names to values, got {value!r}",
                    "write it as {field: value}",
                )
        self.validate()

    def validate(self) -> None:
        from lmstack.config import ModelConfig

        if not isinstance(self.preset, str):
            _bad("preset", f"must be a preset name, got {self.preset!r}", "see `lmstack info` for the names")
        try:
            ModelConfig.preset(self.preset)
        except InputError as exc:
            _bad("preset", str(exc).split(" — ")[0], str(exc).split(" — ", 1)[-1])

        for name in (
            "vocab_size",
            "batch_size",
            "warmup_steps",
            "eval_interval",
            "checkpoint_interval",
            "keep_checkpoints",
        ):
            value = getattr(self, name)
            minimum = 0 if name == "warmup_steps" else 1
            if not _is_int(value) or value < minimum:
                _bad(
                    name,
                    f"must be an integer >= {minimum}, got {value!r}",
                    f"set {name} to an integer >= {minimum}",
                )
        for name in (
            "max_steps",
            "seq_len",
            "micro_batch_size",
            "eval_batches",
            "threads",
            "corpus_max_chars",
        ):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                _bad(
                    name,
                    f"must be a positive integer or null, got {value!r}",
                    f"set {name} to an integer >= 1",
                )
        if self.vocab_size < 257:
            _bad(
                "vocab_size",
                f"a trained tokenizer needs 256 byte ids plus merges, got {self.vocab_size}",
                "use >= 512",
            )
        if self.time_budget is not None and not (_is_num(self.time_budget) and self.time_budget > 0):
            _bad(
                "time_budget",
                f"must be a positive number of minutes, got {self.time_budget!r}",
                "e.g. --time-budget 10",
            )
        for name in ("lr", "eps"):
            if not (_is_num(getattr(self, name)) and getattr(self, name) > 0):
                _bad(name, f"must be > 0, got {getattr(self, name)!r}", "e.g. lr 1e-3, eps 1e-8")
        for name in ("min_lr_ratio", "beta1", "beta2", "label_smoothing"):
            value = getattr(self, name)
            high_ok = name == "min_lr_ratio"
            if not _is_num(value) or value < 0 or value > 1 or (value == 1 and not high_ok):
                _bad(
                    name,
                    f"must lie in [0, 1{']' if high_ok else ')'}, got {value!r}",
                    "e.g. 0.1 / 0.9 / 0.95 / 0.0",
                )
        if not _is_num(self.weight_decay) or self.weight_decay < 0:
            _bad("weight_decay", f"must be >= 0, got {self.weight_decay!r}", "e.g. 0.1, or 0 for none")
        if self.grad_clip is not None and not (_is_num(self.grad_clip) and self.grad_clip > 0):
            _bad(
                "grad_clip",
                f"must be > 0 or null, got {self.grad_clip!r}",
                "e.g. 1.0, or null for no clipping",
            )
        if self.dropout is not None and not (_is_num(self.dropout) and 0 <= self.dropout < 1):
            _bad("dropout", f"must lie in [0, 1), got {self.dropout!r}", "e.g. 0.0 or 0.1")
        if self.precision not in PRECISIONS:
            _bad("precision", f"unknown precision {self.precision!r}", f"use one of {', '.join(PRECISIONS)}")
        if self.optimizer not in OPTIMIZERS:
            _bad("optimizer", f"unknown optimizer {self.optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
        if self.attn_impl not in ("eager", "sdpa", "flash"):
            _bad(
                "attn_impl",
                f"unknown attention implementation {self.attn_impl!r}",
                "use eager, sdpa or flash",
            )
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            _bad(
                "micro_batch_size",
                f"{self.micro_batch_size} is larger than the global batch_size {self.batch_size}",
                "make micro_batch_size <= batch_size",
            )
        if self.peak_flops is not None and not (_is_num(self.peak_flops) and self.peak_flops > 0):
            _bad(
                "peak_flops",
                f"must be a positive FLOP/s figure, got {self.peak_flops!r}",
                "e.g. 989e12, or null",
            )
        if not _is_int(self.sample_tokens) or self.sample_tokens < 0:
            _bad(
                "sample_tokens",
                f"must be an integer >= 0, got {self.sample_tokens!r}",
                "e.g. 64, or 0 for no sample",
            )
        if self.init_from is not None:
            if not isinstance(self.init_from, str) or not self.init_from:
                _bad(
                    "init_from",
                    f"must be a folder path, got {self.init_from!r}",
                    "give a checkpoint or run folder",
                )
            if self.model:
                _bad(
                    "model",
                    "overrides the architecture, but init_from takes it from the checkpoint",
                    "drop the `model` section (dropout has its own field), or train from a preset",
                )
            if self.tokenizer is not None:
                _bad(
                    "tokenizer",
                    "is given, but init_from brings the checkpoint's own tokenizer",
                    "drop --tokenizer (the data is tokenized with the checkpoint's)",
                )
        if self.extend:
            if not self.resume:
                _bad("extend", "only applies to a resumed run", "add --resume, or drop --extend")
            if self.max_steps is None or self.time_budget is not None:
                _bad(
                    "extend",
                    "needs the new total as max_steps, and no time_budget",
                    "pass --resume --extend --max-steps N",
                )
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.model) - known)
        if unknown:
            hints = [
                k + (f" (did you mean {c[0]}?)" if (c := difflib.get_close_matches(k, known, n=1)) else "")
                for k in unknown
            ]
            _bad(
                "model",
                f"unknown ModelConfig field(s) {', '.join(hints)}",
                "use the field names of lmstack.ModelConfig",
            )

    # ---- derived ----------------------------------------------------------------------------
    @property
    def effective_time_budget(self) -> float | None:
        """Minutes: the given budget, or the 10-minute default when no step limit is set either."""
        if self.time_budget is None and self.max_steps is None:
            return DEFAULT_TIME_BUDGET_MIN
        return self.time_budget

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["data"] = list(self.data)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """From a mapping; unknown keys are an error that names the closest valid key."""
        if not isinstance(values, dict):
            raise InputError(f"a training config must be a mapping of settings, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            hints = [
                k + (f" (did you mean {c[0]}?)" if (c := difflib.get_close_matches(k, known, n=1)) else "")
                for k in unknown
            ]
            raise InputError(
                f"unknown training config key(s): {', '.join(hints)} — valid keys: {', '.join(sorted(known))}"
            )
        try:
            return cls(**values)
        except TypeError as exc:
            raise InputError(f"bad training config: {exc} — check the value types") from None

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a YAML (.yaml/.yml) or JSON file."""
        values = read_settings_file(path)
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bad(name: str, problem: str, fix: str) -> None:
    raise InputError(f"TrainConfig.{name}: {problem} — {fix}")
