"""Where a model lives: what every `MODEL` / `--model` argument may name.

A preset name, a `config.json`, a checkpoint folder (config.json + safetensors), or a run folder — the
folder training writes, whose `latest` file names its newest complete checkpoint under
`checkpoints/step_<N>/` (`lmstack.train` writes it). Resolution lives here, below train and infer,
so every command reads run folders the same way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from lmstack.config import ModelConfig
from lmstack.errors import InputError
from lmstack.interop.hf_config import config_from_hf

if TYPE_CHECKING:
    import torch

    from lmstack.model.transformer import Transformer
    from lmstack.tokenizer import Tokenizer

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d+)$")


def latest_checkpoint(run_dir: str | Path, *, verify: bool = True) -> Path | None:
    """The folder `run_dir/latest` names, or None when the run has no complete checkpoint yet."""
    pointer = Path(run_dir) / LATEST
    if not pointer.is_file():
        return None
    target = pointer.read_text(encoding="utf-8").strip()
    path = Path(run_dir) / target
    if verify and (not STEP_DIR.match(path.name) or not path.is_dir()):
        raise InputError(
            f"{pointer} names {target!r}, which is not a checkpoint folder — point it at an existing "
            f"{CHECKPOINTS}/step_<N> (or delete it to start over)"
        )
    return path


def resolve_model_dir(path: str | Path) -> Path:
    """A checkpoint folder as given, or a run folder's latest checkpoint."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"model folder not found: {path} — give a checkpoint folder or a run folder")
    if not path.is_dir():
        raise InputError(f"{path} is a file — give a checkpoint folder (with config.json) or a run folder")
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if (path / CHECKPOINTS).is_dir():
        raise InputError(
            f"run folder {path} has no complete checkpoint yet — train longer or give a checkpoint folder"
        )
    raise InputError(
        f"{path} is neither a checkpoint folder (config.json) nor a run folder (latest) — check the path"
    )


def resolve_model_config(spec: str | Path) -> tuple[ModelConfig, Path | None]:
    """The config a MODEL argument names, and the checkpoint folder it came from (None for a preset
    or a bare config.json)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return config_from_hf(path), None
    if path.is_dir():
        folder = resolve_model_dir(path)
        return config_from_hf(folder), folder
    text = str(spec)
    if path.suffix == ".json" or "/" in text or "\\" in text:
        raise InputError(
            f"no such file or folder: {text} — give a preset name, a checkpoint or run folder, or a config.json"
        )
    return ModelConfig.preset(text), None  # an unknown name raises, listing close matches


def load_model_and_tokenizer(
    spec: str | Path, *, dtype: torch.dtype | str | None = None
) -> tuple[Transformer, Tokenizer]:
    """The model and tokenizer a checkpoint or run folder holds — the one loader every command uses.

    The model carries `tokenizer_hash`, so speculative decoding can check that a draft shares it.
    A preset names no weights, so it is refused here with the fix.
    """
    import torch

    from lmstack.interop.hf import from_pretrained
    from lmstack.tokenizer import Tokenizer

    path = Path(spec).expanduser()
    if not path.exists() and "/" not in str(spec) and not path.suffix:
        raise InputError(
            f"{spec!r} is not a folder — a preset has no trained weights; give a checkpoint or run folder"
        )
    folder = resolve_model_dir(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = from_pretrained(folder, dtype=dtype)
    try:
        tokenizer = Tokenizer.load(folder)
    except FileNotFoundError:
        raise InputError(
            f"{folder} has no tokenizer files — save the checkpoint with its tokenizer"
        ) from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise InputError(
            f"the tokenizer in {folder} has {tokenizer.vocab_size} ids but the model only "
            f"{model.config.vocab_size} — they do not belong together"
        )
    model.tokenizer_hash = tokenizer.content_hash
    return model, tokenizer


# What a chat request samples with when neither the request nor the model folder says otherwise.
CHAT_SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 0.9}
_SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


def generation_defaults(folder: str | Path) -> dict:
    """SamplingParams field values a model folder's generation_config.json recommends.

    Like vLLM, only the sampling fields the file sets count (`transformers`' own defaults, e.g. top_k=50,
    do not): `do_sample: false` means greedy (temperature 0), `do_sample: true` without a temperature
    means 1.0, `top_k: 0` disables top-k. A file without any sampling field (ours hold only token ids)
    gives the chat defaults, temperature 0.7 and top-p 0.9.
    """
    import json

    path = Path(folder) / "generation_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc} — fix or delete the file") from None
    if not isinstance(raw, dict) or not any(raw.get(k) is not None for k in _SAMPLING_KEYS):
        return dict(CHAT_SAMPLING_DEFAULTS)
    out: dict = {}
    for key in ("temperature", "top_p", "repetition_penalty"):
        if raw.get(key) is not None:
            out[key] = float(raw[key])
    if raw.get("top_k") is not None:
        out["top_k"] = int(raw["top_k"]) or None
    if raw.get("top_p") is not None and out["top_p"] >= 1.0:
        out["top_p"] = None
    if raw.get("do_sample") is False:
        out["temperature"] = 0.0
    elif raw.get("do_sample") is True and "temperature" not in out:
        out["temperature"] = 1.0
    return out
