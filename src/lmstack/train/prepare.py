"""What a run needs before its first step: checked inputs, the run folder, the data, the model, the
precision.

`check_inputs` validates everything that can be checked without doing work (paths, the preset and its
overrides, the context length, the batch split, the `init_from` folder), so a bad argument stops the
run before any folder is created. `prepare_data` turns `--data` into a prepared dataset: a prepared folder is used as is; raw files (or,
when none are given, the embedded default corpus) go through `lmstack.data.pipeline.prepare_dataset`,
which curates them, trains the BPE tokenizer unless one is given, and writes the token shards into
`<run>/data`. The model's vocabulary then comes from that tokenizer. `initial_model` builds the preset
fresh, or loads `init_from` (whose tokenizer the data is then tokenized with).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.atomic import atomic_write_text, writable_dir
from lmstack.config import ModelConfig
from lmstack.errors import InputError
from lmstack.train import distributed as dist_mod
from lmstack.train.config import TrainConfig
from lmstack.train.distributed import DistInfo


def check_inputs(config: TrainConfig, info: DistInfo) -> None:
    """Raise `InputError` for anything wrong with `config` that is knowable before any work starts."""
    from lmstack.data.pipeline import is_prepared_dataset

    prepared = len(config.data) == 1 and is_prepared_dataset(config.data[0])
    if prepared and config.tokenizer is not None:
        raise InputError(
            f"{config.data[0]} is a prepared dataset, which carries its own tokenizer — drop --tokenizer "
            "or give raw text files"
        )
    if not prepared:
        for path in config.data:
            if not Path(path).expanduser().exists():
                raise InputError(
                    f"data path not found: {path} — give text files or folders, or a prepared dataset folder"
                )
    if config.tokenizer is not None and not Path(config.tokenizer).expanduser().is_dir():
        raise InputError(f"tokenizer folder not found: {config.tokenizer} — give a tokenizer folder")
    if not prepared:
        from lmstack.data.config import DataConfig

        DataConfig.from_dict(config.data_config)
    precision = precision_for(config, info.device)
    if precision == "bf16" and info.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError("this GPU has no bfloat16 support — use precision fp16 or fp32")
    if precision == "fp16" and info.device.type != "cuda":
        raise InputError("fp16 training needs a CUDA GPU — use precision fp32 or bf16 on the CPU")
    planned = planned_model_config(config)
    seq_len = config.seq_len or planned.max_seq_len
    if seq_len > planned.max_seq_len:
        where = "the checkpoint's config" if config.init_from else "the `model` section"
        raise InputError(
            f"seq_len {seq_len} is longer than the model's context (max_seq_len={planned.max_seq_len}) — use "
            f"seq_len <= {planned.max_seq_len}, or raise max_seq_len in {where}"
        )
    micro = config.micro_batch_size or config.batch_size // info.world_size
    if micro < 1 or config.batch_size % (micro * info.world_size):
        raise InputError(
            f"batch_size {config.batch_size} is not a multiple of micro_batch_size {micro} × {info.world_size} "
            "processes — choose sizes that divide evenly"
        )


def planned_model_config(config: TrainConfig) -> ModelConfig:
    """The model's config as far as it is known before the tokenizer exists: `init_from`'s, or the
    preset with the overrides (building it validates every override)."""
    if config.init_from is not None:
        from lmstack.interop.folders import resolve_model_dir
        from lmstack.interop.hf_config import config_from_hf

        if not Path(config.init_from).expanduser().is_dir():
            raise InputError(
                f"init_from {config.init_from!r} is not a folder — give a checkpoint, run or Hugging Face folder "
                "(a preset has no trained weights: use --preset to train one from scratch)"
            )
        return config_from_hf(resolve_model_dir(config.init_from))
    from types import SimpleNamespace

    placeholder = SimpleNamespace(vocab_size=config.vocab_size, eos_id=config.vocab_size - 1, bos_id=None)
    return model_config_for(config, placeholder)


def resolve_run_dir(config: TrainConfig, info: DistInfo) -> Path:
    """`config.out`, or runs/<timestamp> (chosen by rank 0); created and checked to be writable."""
    name = config.out or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(dist_mod.broadcast_object(name, info)).expanduser()

    return dist_mod.run_on_main(lambda: writable_dir(run_dir), info)


def prepare_data(config: TrainConfig, run_dir: Path, info: DistInfo) -> Any:
    """The `DatasetInfo` to train on: a prepared dataset given as `--data`, or one the pipeline makes
    in `run_dir/data` from the given raw files (default: the embedded corpus), rank 0 writing it."""
    from lmstack.data.config import DataConfig
    from lmstack.data.pipeline import is_prepared_dataset, load_dataset_info, prepare_dataset

    if len(config.data) == 1 and is_prepared_dataset(config.data[0]):
        return load_dataset_info(config.data[0])
    tokenizer = config.tokenizer
    if config.init_from is not None:
        from lmstack.interop.folders import resolve_model_dir

        tokenizer = str(resolve_model_dir(config.init_from))  # the checkpoint's own tokenizer
    data_config = DataConfig.from_dict(config.data_config)
    out = run_dir / "data"

    def prepare() -> Any:
        inputs = [Path(p) for p in config.data] or default_corpus_files(
            run_dir / "corpus", config.corpus_max_chars
        )
        return prepare_dataset(
            inputs,
            out,
            tokenizer=tokenizer,
            vocab_size=config.vocab_size,
            config=data_config,
            progress=config.progress,
        )

    dist_mod.run_on_main(prepare, info)  # one process writes the dataset; an error stops every rank
    return load_dataset_info(out)


def default_corpus_files(folder: Path, max_chars: int | None = None) -> list[Path]:
    """The embedded default corpus as JSONL files; `max_chars` keeps a prefix of each source
    (an equal share of the limit each) for quick smoke runs."""
    from lmstack.data.corpus import write_default_corpus

    paths = write_default_corpus(folder)
    if max_chars is not None:
        share = max_chars // max(1, len(paths))
        for path in paths:
            kept, chars = [], 0
            for line in path.read_text(encoding="utf-8").splitlines():
                if chars >= share:
                    break
                kept.append(line)
                chars += len(json.loads(line)["text"])
            atomic_write_text(path, "\n".join(kept) + "\n")
    return paths


def model_config_for(config: TrainConfig, tokenizer: Any) -> ModelConfig:
    """The preset with the run's overrides, its vocabulary and special ids taken from the tokenizer
    (the preset's own ids belong to another vocabulary).

    Built from the preset's table entry rather than `dataclasses.replace` on the resolved config, so
    an override of `d_model` or `n_heads` re-derives `head_dim` (and `n_kv_heads`) unless the preset
    or the override sets them."""
    from lmstack.presets import PRESETS

    ModelConfig.preset(config.preset)  # an unknown name raises with suggestions
    values: dict[str, Any] = {
        **PRESETS[config.preset],
        "bos_id": tokenizer.bos_id,
        "pad_id": None,
        **config.model,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
    }
    if config.dropout is not None:
        values["dropout"] = config.dropout
    try:
        return ModelConfig(name=config.preset, **values)
    except TypeError as exc:
        raise InputError(f"bad model override: {exc} — check the `model` section of the config") from None


def initial_model(config: TrainConfig, tokenizer: Any, device: torch.device) -> nn.Module:
    """The model step 0 starts from: the preset built fresh (seeded), or `init_from`'s weights in
    float32 (master weights; autocast supplies the low precision), with the run's dropout."""
    from lmstack.model import build_model

    if config.init_from is None:
        model_config = model_config_for(config, tokenizer)
        return build_model(model_config, device=device, attn_impl=config.attn_impl, seed=config.seed)
    from lmstack.interop.folders import load_model_and_tokenizer

    model, own = load_model_and_tokenizer(config.init_from, dtype=torch.float32)
    if own.content_hash != tokenizer.content_hash:
        raise InputError(
            f"the data was tokenized with another tokenizer than init_from's ({config.init_from}) — give raw "
            "text (it is then tokenized with the checkpoint's tokenizer) or a dataset prepared with it"
        )
    if config.dropout is not None and config.dropout != model.config.dropout:
        loaded = model
        model = build_model(dataclasses.replace(loaded.config, dropout=config.dropout), seed=config.seed)
        model.load_state_dict(loaded.state_dict())
    model.set_attn_impl(config.attn_impl)
    return model.to(device)


def config_hash(model_config: ModelConfig) -> str:
    data = {k: v for k, v in model_config.to_dict().items() if k not in ("name", "dropout")}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def precision_for(config: TrainConfig, device: torch.device) -> str:
    if config.precision != "auto":
        return config.precision
    return "bf16" if device.type == "cuda" else "fp32"


def autocast_for(precision: str, device: torch.device) -> Callable[[], Any]:
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)
