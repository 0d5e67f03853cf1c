"""The run folder's checkpoints: written atomically, verified on read, never pickled.

    run/
      checkpoints/step_<N>/     a checkpoint folder `lmstack.interop.hf.save_pretrained` writes
                                (config.json, model.safetensors, generation_config.json, tokenizer)
                                + trainer/optimizer.safetensors  optimizer state, tensors by parameter name
                                + trainer/method.safetensors     the training method's tensors
                                + trainer/state.json      step, schedule, RNG, data position, config
                                                          hash, and the SHA-256 of every other file
      latest                    "checkpoints/step_<N>": the checkpoint a resume starts from

Writing: everything goes to `step_<N>.tmp/`, each file and the folder are fsynced, the folder is
renamed to `step_<N>/`, and only then is `latest` replaced (write `latest.tmp`, fsync, rename). A
crash at any instant leaves `latest` naming a complete checkpoint (or no `latest` at all before the
first one); a leftover `.tmp` folder is ignored and overwritten. Older checkpoints beyond `keep` are
deleted only after the new pointer is in place.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.atomic import atomic_write_text, fsync_tree, replace_dir
from lmstack.errors import InputError
from lmstack.interop.folders import CHECKPOINTS, LATEST, STEP_DIR, latest_checkpoint

TRAINER_DIR = "trainer"  # a subfolder: loaders that read every *.safetensors of a checkpoint ignore it
STATE_JSON = f"{TRAINER_DIR}/state.json"
OPTIMIZER_FILE = f"{TRAINER_DIR}/optimizer.safetensors"
METHOD_FILE = f"{TRAINER_DIR}/method.safetensors"  # the training method's own tensors (method.py)
STATE_FORMAT = "lmstack-trainer-state"
STATE_VERSION = 1


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step}"


# ---------------------------------------------------------------------------------------- writing


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    *,
    tokenizer: Any,
    optimizer_tensors: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    method_tensors: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
    on_stage: Callable[[str, Path], None] | None = None,
) -> Path:
    """Write checkpoint `step` of `run_dir` atomically and point `latest` at it; returns its folder.

    `on_stage(stage, path)` is called after "written" (the `.tmp` folder is complete), "renamed" (the
    folder is in place, `latest` not yet moved) and "pointed": a test hook to crash at those instants.
    """
    from safetensors.torch import save_file

    from lmstack.interop.folders import CHAT_SAMPLING_DEFAULTS
    from lmstack.interop.hf import save_pretrained

    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash while writing
    final.parent.mkdir(parents=True, exist_ok=True)
    # a trained model is meant to be sampled: greedy decoding of a small model loops on one phrase
    save_pretrained(model, tmp, tokenizer=tokenizer, generation={"do_sample": True, **CHAT_SAMPLING_DEFAULTS})
    (tmp / TRAINER_DIR).mkdir()
    save_file(optimizer_tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": STATE_FORMAT})
    method = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in (method_tensors or {}).items()}
    save_file(method, str(tmp / METHOD_FILE), metadata={"format": STATE_FORMAT})
    state = {"format": STATE_FORMAT, "version": STATE_VERSION, **trainer_state, "step": step}
    state["files"] = {rel: _sha256(tmp / rel) for rel in _files(tmp) if rel != STATE_JSON}
    (tmp / STATE_JSON).write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
    fsync_tree(tmp)
    _stage(on_stage, "written", tmp)
    replace_dir(tmp, final)
    _stage(on_stage, "renamed", final)
    atomic_write_text(Path(run_dir) / LATEST, f"{CHECKPOINTS}/{final.name}\n")
    _stage(on_stage, "pointed", final)
    prune(run_dir, keep)
    return final


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (never the one `latest` names)."""
    latest = latest_checkpoint(run_dir, verify=False)
    steps = sorted(checkpoint_steps(run_dir))
    for step in steps[: max(0, len(steps) - keep)]:
        path = step_dir(run_dir, step)
        if latest is None or path.resolve() != latest.resolve():
            shutil.rmtree(path, ignore_errors=True)


def checkpoint_steps(run_dir: Path) -> list[int]:
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())


def _stage(hook: Callable[[str, Path], None] | None, stage: str, path: Path) -> None:
    if hook is not None:
        hook(stage, path)


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_trainer_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The trainer state JSON and optimizer tensors of a checkpoint, after checking every file's
    SHA-256 against the record; any mismatch or unreadable part is a clear `InputError`. The method's
    tensors (verified here too) are read by `read_method_tensors`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    fix = f"the checkpoint {ckpt} is corrupt — delete it and point {ckpt.parent.parent / LATEST} at an earlier checkpoint, or start a new run"
    try:
        state = json.loads((ckpt / STATE_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{ckpt / STATE_JSON} is missing: {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{ckpt / STATE_JSON} is unreadable ({exc}): {fix}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InputError(f"{ckpt / STATE_JSON} is not an lmstack trainer state: {fix}")
    if state.get("version") != STATE_VERSION:
        raise InputError(
            f"{ckpt / STATE_JSON} has trainer-state version {state.get('version')}; this lmstack reads {STATE_VERSION}"
        )
    for rel, expected in sorted(state.get("files", {}).items()):
        path = ckpt / rel
        if not path.is_file():
            raise InputError(f"{path} is missing: {fix}")
        if _sha256(path) != expected:
            raise InputError(f"{path} does not match its recorded SHA-256: {fix}")
    try:
        tensors = load_file(str(ckpt / OPTIMIZER_FILE))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise InputError(f"{ckpt / OPTIMIZER_FILE} is unreadable ({exc}): {fix}") from None
    return state, tensors


def read_method_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The training method's tensors of a checkpoint (empty for checkpoints written before methods
    had any); call after `read_trainer_state`, which verified the file's hash."""
    from safetensors.torch import load_file

    path = Path(ckpt) / METHOD_FILE
    return load_file(str(path)) if path.is_file() else {}


def weights_hash(folder: str | Path) -> str:
    """SHA-256 over a checkpoint folder's weight files (names and bytes, in name order): what a
    method records to name a frozen model (a reference) without copying it."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder} holds no *.safetensors weights — give a checkpoint folder")
    for path in files:
        digest.update(path.name.encode() + b"\0" + _sha256(path).encode())
    return digest.hexdigest()


def load_model_weights(model: nn.Module, ckpt: Path) -> None:
    """Copy a checkpoint's weights into `model` (same config) through the Hugging Face loader."""
    from lmstack.interop.hf import from_pretrained

    try:
        loaded = from_pretrained(ckpt)
    except InputError as exc:
        raise InputError(f"cannot load the weights of checkpoint {ckpt}: {exc}") from None
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise InputError(
            f"checkpoint {ckpt} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]}) "
            "— resume with the same model config"
        )


# ---------------------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Torch's CPU (and CUDA) generator states as base64 strings: the dropout masks to come."""
    out: dict[str, Any] = {"torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["torch_cpu"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(state["torch_cuda"]))
