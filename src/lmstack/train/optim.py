"""AdamW with decoupled weight decay, its parameter groups, and its state as plain tensors.

AdamW (Loshchilov & Hutter 2019) applies weight decay directly to the weights, θ ← θ − lr·λ·θ, instead
of adding λθ to the gradient where Adam's per-parameter scaling would distort it. Decay
pulls weights towards zero; that is wanted for the matrices, but not for norm gains
(decaying them towards 0 fights the normalisation), biases (they do not multiply inputs, so shrinking
them does not regularise), and, by default, embeddings (each row is updated only when its token
appears, so decay would erase rare tokens).

The optimizer state is exported as named tensors (`optimizer_tensors`) and restored from them
(`load_optimizer_tensors`), so a checkpoint stores it in safetensors rather than pickle.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmstack.errors import InputError
from lmstack.model.norm import Norm


def param_groups(
    model: nn.Module, weight_decay: float, *, decay_embeddings: bool = False
) -> list[dict[str, Any]]:
    """Two AdamW groups: `decay` (weight matrices) and `no_decay` (norms, biases, embeddings).

    Each group carries `names` (parameter names in `model`) so its state can be saved by name. A
    parameter shared by two modules (tied embeddings and LM head) appears once, under its first name.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, Norm) or isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
        elif isinstance(module, nn.Embedding) and not decay_embeddings:
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    groups: dict[str, dict[str, Any]] = {
        "decay": {"params": [], "names": [], "weight_decay": weight_decay},
        "no_decay": {"params": [], "names": [], "weight_decay": 0.0},
    }
    for name, param in model.named_parameters():  # shared parameters are yielded once
        if not param.requires_grad:
            continue
        kind = "no_decay" if id(param) in no_decay or name.endswith("bias") else "decay"
        groups[kind]["params"].append(param)
        groups[kind]["names"].append(name)
    return [dict(g, group=k) for k, g in groups.items() if g["params"]]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    decay_embeddings: bool = False,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """`torch.optim.AdamW` over `param_groups(model)`; `fused` picks the one-kernel CUDA update."""
    groups = param_groups(model, weight_decay, decay_embeddings=decay_embeddings)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's per-parameter state as `{"<param name>/<key>": tensor}` plus the JSON-able rest
    (hyperparameters per group and any non-tensor state). Names come from each group's `names`."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    groups = []
    for group in optimizer.param_groups:
        groups.append({k: v for k, v in group.items() if k not in ("params",) and _jsonable(v)})
        for name, param in zip(group["names"], group["params"]):
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}/{key}"] = (
                        value.detach().to("cpu", copy=True).contiguous()
                    )  # a snapshot, never an alias
                else:
                    scalars[f"{name}/{key}"] = value
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Restore what `optimizer_tensors` exported into an optimizer built over the same parameters
    (through `load_state_dict`, which moves each state tensor to its parameter's device)."""
    saved_groups = meta.get("param_groups", [])
    if [g.get("names") for g in saved_groups] != [g["names"] for g in optimizer.param_groups]:
        raise InputError(
            "the checkpoint's optimizer state was saved for different parameters — resume with the same "
            "model and optimizer settings"
        )
    current = optimizer.state_dict()
    index: dict[str, int] = {}
    for group, indexed in zip(optimizer.param_groups, current["param_groups"]):
        index.update(zip(group["names"], indexed["params"]))
    state: dict[int, dict[str, Any]] = {}
    for full, value in [*tensors.items(), *meta.get("scalars", {}).items()]:
        name, _, key = full.rpartition("/")
        if name not in index:
            raise InputError(
                f"the checkpoint's optimizer state names an unknown parameter {name!r} — resume with the same model"
            )
        state.setdefault(index[name], {})[key] = value.clone() if isinstance(value, torch.Tensor) else value
    groups = []
    for indexed, saved in zip(current["param_groups"], saved_groups):
        restored = {k: tuple(v) if isinstance(v, list) and k == "betas" else v for k, v in saved.items()}
        groups.append({**indexed, **restored, "params": indexed["params"]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _jsonable(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_jsonable(v) for v in value)
    return False
