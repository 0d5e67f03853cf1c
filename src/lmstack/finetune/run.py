"""`finetune(config)`: a fine-tuning run through the one training loop.

    base model (checkpoint or run folder) ─► chat-ready base (ChatML added if it has no template)
        ─► TrainConfig(init_from=base) + a Method (SFT or DPO, with or without adapters) ─► train()

`FinetuneConfig` holds what a user chooses; `finetune` turns it into the loop's `TrainConfig` and a
method and calls `lmstack.train.train`. The run folder is an ordinary run (checkpoints, metrics,
resume); with an adapter each checkpoint also holds a PEFT adapter folder. The starting model is
recorded by path and weights hash, and a resume against changed weights is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.atomic import atomic_write_text
from lmstack.errors import InputError
from lmstack.finetune.adapters import ADAPTERS, AdapterSetup, lora_config_for
from lmstack.finetune.data import TRUNCATE

METHODS = ("sft", "dpo")
FINETUNE_CONFIG_FILE = "finetune_config.json"
CHAT_BASE_DIR = "base"  # inside the run folder: the base with ChatML added, when it had no template


def shipped_dataset(split: str = "train") -> Path:
    """The loan-application instruction set shipped with the package (train or heldout split)."""
    return Path(__file__).parent / "datasets" / f"loans_{split}.jsonl"


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. `data=None` uses the shipped instruction set (SFT)."""

    model: str
    out: str
    data: str | None = None
    method: str = "sft"
    val_data: str | None = None
    val_fraction: float = 0.1
    resume: bool = False
    # adapters
    adapter: str = "none"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q,v"
    rslora: bool = False
    # length: max_steps, or epochs over the training examples (default 1 epoch)
    max_steps: int | None = None
    epochs: float | None = None
    # batches and sequences
    seq_len: int | None = None  # None: the model's context
    packing: bool = False
    truncate: str = "drop"
    batch_size: int = 8
    micro_batch_size: int | None = None
    # optimisation
    optimizer: str = "adamw"
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    # DPO
    beta: float = 0.1
    sft_weight: float = 0.0  # w x the chosen replies' NLL added to DPO's loss (RPO); see finetune/dpo.py
    reference: str | None = None  # default: the starting model
    # the rest
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    eval_interval: int = 50
    checkpoint_interval: int = 100
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r} — use one of {', '.join(METHODS)}")
        if self.adapter not in ADAPTERS:
            raise InputError(f"unknown adapter {self.adapter!r} — use one of {', '.join(ADAPTERS)}")
        if self.truncate not in TRUNCATE:
            raise InputError(f"unknown truncate policy {self.truncate!r} — use one of {', '.join(TRUNCATE)}")
        if self.max_steps is not None and self.epochs is not None:
            raise InputError("both max_steps and epochs are given — choose one")
        if self.epochs is not None and not self.epochs > 0:
            raise InputError(f"epochs={self.epochs} must be > 0 — e.g. 1 or 2.5")
        if not 0 < self.val_fraction < 1:
            raise InputError(f"val_fraction={self.val_fraction} must lie in (0, 1) — e.g. 0.1")
        if not self.beta > 0:
            raise InputError(f"beta={self.beta} must be > 0 — DPO's usual range is 0.1 to 0.5")
        if not self.sft_weight >= 0:
            raise InputError(f"sft_weight={self.sft_weight} must be >= 0 — 0 is plain DPO, 1 is RPO's weight")
        if self.method == "dpo" and self.data is None:
            raise InputError("DPO needs preference data — pass --data FILE.jsonl with prompt/chosen/rejected")
        lora_config_for(
            self.adapter,
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            targets=self.lora_targets,
            rslora=self.rslora,
        )  # fmt: skip  (validates the LoRA settings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FinetuneResult:
    train: Any  # lmstack.train.TrainResult
    base: dict[str, str]  # {"path", "sha256"} of the starting model
    data_summary: str  # what happened to the examples (kept, dropped, truncated)
    adapter: Path | None  # the latest checkpoint's PEFT adapter folder


def _record(folder: Path) -> dict[str, str]:
    from lmstack.train.checkpoint import weights_hash

    return {"path": str(folder), "sha256": weights_hash(folder)}


def build_method(config: FinetuneConfig, tokenizer_path: Path, base: dict[str, str]) -> Any:
    """The fine-tuning `Method` a config asks for."""
    lora = lora_config_for(
        config.adapter, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
        targets=config.lora_targets, rslora=config.rslora,
    )  # fmt: skip
    from lmstack.finetune.vocab import added_token_ids

    # the base the adapter applies to (QLoRA stores it in NF4); the rows of tokens it added train beside
    # the adapters
    new_rows = added_token_ids(Path(base["path"]), tokenizer_path) if lora is not None else ()
    adapters = AdapterSetup(
        lora, base_path=str(tokenizer_path), qlora=config.adapter == "qlora", token_ids=new_rows
    )
    data = config.data or str(shipped_dataset("train"))
    common = dict(
        tokenizer_path=tokenizer_path, val_data=config.val_data, val_fraction=config.val_fraction,
        truncate=config.truncate, adapters=adapters, base=base,
    )  # fmt: skip
    if config.method == "dpo":
        from lmstack.finetune.dpo import DPO

        return DPO(data, beta=config.beta, sft_weight=config.sft_weight, reference=config.reference, **common)
    from lmstack.finetune.sft import SFT

    return SFT(data, packing=config.packing, **common)


def train_config(config: FinetuneConfig, init_from: Path, max_steps: int | None = None) -> Any:
    from lmstack.train import TrainConfig

    return TrainConfig(
        init_from=str(init_from), out=config.out, resume=config.resume, max_steps=max_steps, seq_len=config.seq_len,
        batch_size=config.batch_size, micro_batch_size=config.micro_batch_size, lr=config.lr,
        warmup_steps=config.warmup_steps, weight_decay=config.weight_decay, optimizer=config.optimizer,
        seed=config.seed, device=config.device, precision=config.precision, threads=config.threads,
        eval_interval=config.eval_interval, eval_batches=None, checkpoint_interval=config.checkpoint_interval,
        progress=config.progress, sample_tokens=0,
    )  # fmt: skip


def finetune(config: FinetuneConfig, *, hooks: Any = None) -> FinetuneResult:
    """Run (or resume) the fine-tuning `config` describes; see the module docstring."""
    from lmstack.finetune.adapters import ADAPTER_DIR
    from lmstack.finetune.vocab import chat_ready_base
    from lmstack.interop.folders import resolve_model_dir
    from lmstack.train import train

    out = Path(config.out).expanduser()
    saved_path = out / FINETUNE_CONFIG_FILE
    if not config.resume and saved_path.exists():
        raise InputError(
            f"{out} already holds a fine-tuning run — pass --resume to continue it, or another --out"
        )
    base_dir = resolve_model_dir(config.model)
    if config.adapter == "qlora":
        from lmstack.finetune.qlora import check_float_base

        check_float_base(base_dir)
    base = _record(base_dir)
    if config.resume and saved_path.is_file():
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        if saved["base"]["sha256"] != base["sha256"]:
            raise InputError(
                f"{out} was fine-tuned from {saved['base']['path']} and those weights have changed since — resume "
                "from the original base, or start a new run with another --out"
            )
    start = chat_ready_base(base_dir, out / CHAT_BASE_DIR)
    method = build_method(config, start, base)
    steps = config.max_steps
    if steps is None:  # epochs (default 1) over the training items, counted as the method sees them
        first = train_config(config, start)
        method.dataset(first, out, None)
        per_epoch = len(method.train_items()) / config.batch_size
        steps = max(1, math.ceil((config.epochs or 1.0) * per_epoch))
    out.mkdir(parents=True, exist_ok=True)
    if not config.resume or not saved_path.exists():
        record = {"config": config.to_dict(), "base": base, "start": str(start), "max_steps": steps}
        atomic_write_text(saved_path, json.dumps(record, indent=2) + "\n")
    result = train(train_config(config, start, steps), method=method, hooks=hooks)
    adapter = None
    if result.checkpoint is not None and (result.checkpoint / ADAPTER_DIR).is_dir():
        adapter = result.checkpoint / ADAPTER_DIR
    return FinetuneResult(result, base, method.stats.summary(), adapter)
