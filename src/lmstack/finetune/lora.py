"""LoRA and DoRA: low-rank adapters injected into a model's `nn.Linear` layers, and PEFT's folder format.

LoRA (Hu et al. 2021) freezes a linear layer's weight W (d_out × d_in) and learns a low-rank update:

    y = W x + b + s · B A dropout(x),    A: r × d_in,  B: d_out × r,  s = α / r   (rsLoRA: α / √r)

A starts Kaiming-uniform and B at zero, so at step 0 the adapted model equals the base model exactly.
rsLoRA (Kalajdzievski 2023) scales by α/√r so that the update's size does not shrink as r grows.

DoRA (Liu et al. 2024) splits the adapted weight into a learned magnitude m (one per output row,
initialised to the row norms ‖W‖ so step 0 again equals the base) and a direction:

    W' = m · (W + s B A) / ‖W + s B A‖      (norm over each output row)

Following the paper's §4.3 (and PEFT), the norm is treated as a constant in backward (detached), which
saves the memory of its graph; only m, A and B get gradients. With dropout the forward is computed
as PEFT does, base output plus a correction, so that dropout on the adapter path leaves the base path
intact; without it, as the one product m/‖W + sBA‖ · (Wx + sBAx) + b, which keeps half the memory:

    y = W x + b + (m/‖W + sBA‖ − 1) · W x̃ + (m/‖W + sBA‖) · s · B A x̃,    x̃ = dropout(x)

`LoraLinear` is an `nn.Linear` that keeps the base layer's own `weight` and `bias` parameters (so the
model's state-dict names, and any tied parameters, stay as they were) and adds `lora_A`, `lora_B` and,
for DoRA, `lora_magnitude`. Adapters on a 16-bit base are kept in fp32, as PEFT does by default.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.atomic import atomic_write_bytes, atomic_write_text
from lmstack.errors import InputError

ALL_LINEAR = "all-linear"
OUTPUT_LAYER = "lm_head"  # never adapted by "all-linear" (as PEFT): it is often tied to the embedding


@dataclass(frozen=True)
class LoraConfig:
    """Which layers get adapters, their rank r and scale α, and the LoRA variant."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = ("q", "v")
    rslora: bool = False
    use_dora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise InputError(f"LoRA rank r={self.r!r} is not a positive integer — use e.g. r=8")
        if not self.alpha > 0:
            raise InputError(f"LoRA alpha={self.alpha!r} must be > 0 — use e.g. alpha=2*r")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"LoRA dropout={self.dropout!r} is outside [0, 1) — use e.g. 0.05")
        targets = self.targets
        if isinstance(targets, str) and targets != ALL_LINEAR:
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        if not isinstance(targets, str):
            targets = tuple(dict.fromkeys(targets))
            if not targets or not all(isinstance(t, str) and t and "." not in t for t in targets):
                raise InputError(
                    f"LoRA targets {self.targets!r} must be layer names such as ('q', 'v') or "
                    f"{ALL_LINEAR!r} — name the last component of each linear layer"
                )
        object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.rslora)


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """s = α/r (Hu et al. 2021), or α/√r (rsLoRA, Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def _adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    # Low-rank updates are small next to W; in 16 bits their steps would round away (PEFT's
    # autocast_adapter_dtype does the same).
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class LoraLinear(nn.Linear):
    """`base` with a trainable low-rank update (and DoRA magnitude); see the module doc for the math."""

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: we adopt base's parameters instead of new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.alpha, self.rslora, self.use_dora = r, alpha, rslora, use_dora
        self.scale = lora_scale(r, alpha, rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = {"device": base.weight.device, "dtype": _adapter_dtype(base.weight.dtype)}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        if base.weight.device.type != "meta":
            # He et al. 2015 uniform init with a=√5, nn.Linear's (and PEFT's) choice for A
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_magnitude = None
        if use_dora:
            norm = torch.linalg.vector_norm(self.weight.detach().to(kw["dtype"]), dim=1)
            self.lora_magnitude = nn.Parameter(norm)  # (d_out,) = row norms, so step 0 equals the base
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """s · B A, the (d_out, d_in) update LoRA adds to W."""
        return self.scale * (self.lora_B @ self.lora_A)

    def _dora_factor(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """m / ‖W + sBA‖ per output row, the norm detached (DoRA §4.3)."""
        norm = torch.linalg.vector_norm(weight + delta.detach(), dim=1).detach()
        return self.lora_magnitude / norm  # (d_out,)

    def base_weight(self) -> torch.Tensor:
        """The frozen W (d_out, d_in); QLoRA's subclass decodes it from NF4 here."""
        return self.weight

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """W x + b, the frozen layer's output."""
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        if self.merged:
            return result
        dtype = self.lora_A.dtype
        xd = self.lora_dropout(x.to(dtype))
        update = F.linear(F.linear(xd, self.lora_A), self.lora_B)  # (..., d_in) -> (..., r) -> (..., d_out)
        if not self.use_dora:
            return result + (self.scale * update).to(result.dtype)
        weight = self.base_weight().to(dtype)
        factor = self._dora_factor(weight, self.delta_weight())
        bias = self.bias.to(dtype) if self.bias is not None else 0
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            # both paths see x, so y = m/‖W + sBA‖ · (Wx + sBAx) + b: one product, whose backward keeps
            # one (..., d_out) tensor, not Wx and BAx apart as the correction form below does
            direction = result.to(dtype) - bias + self.scale * update
            return (factor * direction + bias).to(result.dtype)
        base = F.linear(xd, weight)  # the direction sees the same dropped-out input as the update
        return result + ((factor - 1) * base + factor * self.scale * update).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into `weight`: W ← W + sBA (LoRA), W ← m (W + sBA)/‖W + sBA‖ (DoRA)."""
        if self.merged:
            return
        weight = self.weight.to(self.lora_A.dtype)
        delta = self.delta_weight()
        if self.use_dora:
            # kept for `unmerge`: the factor cannot be recomputed from the merged weight alone
            self._merged_factor = self._dora_factor(weight, delta)
            merged = self._merged_factor[:, None] * (weight + delta)
        else:
            merged = weight + delta
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: W ← W' − sBA (LoRA), W ← W' / (m/‖W + sBA‖) − sBA (DoRA)."""
        if not self.merged:
            return
        weight = self.weight.to(self.lora_A.dtype)
        delta = self.delta_weight()
        if self.use_dora:
            weight = weight / self._merged_factor[:, None]
            del self._merged_factor
        self.weight.copy_((weight - delta).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        kind = "dora" if self.use_dora else "lora"
        return f"{super().extra_repr()}, {kind} r={self.r}, alpha={self.alpha}, scale={self.scale:g}"


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoraLinear)]


def select_targets(model: nn.Module, targets: tuple[str, ...] | str) -> list[str]:
    """Module paths of the `nn.Linear` layers `targets` picks, by the last component of their names.

    `"all-linear"` picks every linear layer except the output layer `lm_head` (as PEFT). A named target
    that matches no layer is an error listing the names the model has.
    """
    names = _linear_names(model)
    last = {n: n.rsplit(".", 1)[-1] for n in names}
    if targets == ALL_LINEAR:
        return [n for n in names if last[n] != OUTPUT_LAYER]
    present = sorted(set(last.values()))
    missing = [t for t in targets if t not in present]
    if missing:
        raise InputError(
            f"LoRA target(s) {', '.join(missing)} match no linear layer — the model's linear layers are "
            f"named {', '.join(present) or '(none)'}"
        )
    return [n for n in names if last[n] in targets]


def inject(model: nn.Module, paths: Iterable[str], config: LoraConfig) -> nn.Module:
    """Replace each `nn.Linear` at `paths` by a `LoraLinear` around it (a layer shared by two paths gets
    one adapter). Does not freeze anything; `apply_lora` does."""
    wrapped: dict[int, LoraLinear] = {}
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        base = getattr(parent, child)
        if isinstance(base, LoraLinear):
            raise InputError(f"layer {path!r} already has a LoRA adapter — apply LoRA to the base model once")
        if id(base) not in wrapped:
            wrapped[id(base)] = LoraLinear(
                base, config.r, config.alpha, config.dropout, rslora=config.rslora, use_dora=config.use_dora
            )
        setattr(parent, child, wrapped[id(base)])
    return model


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Freeze `model` and add a trainable adapter to each layer `config.targets` selects (in place)."""
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise InputError("the model already has LoRA adapters — merge or load them instead of applying twice")
    paths = select_targets(model, config.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    return inject(model, paths, config)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Each distinct `LoraLinear` under its first module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight; the forward then runs the plain linear layers."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), []).append(name)
    layers = lora_layers(model)
    for path, layer in layers.items():
        others = sorted(
            set(holders.get(id(getattr(layer, "weight", None)), ()))  # an NF4 base has no float weight
            - {n for n, m in layers.items() if m is layer}
            - {path}
        )
        if others:
            raise InputError(
                f"layer {path!r} shares its weight with {', '.join(others)} (tied weights) — merging would "
                "change both; keep this adapter unmerged, or untie the weights first"
            )
    for layer in layers.values():
        layer.merge()
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter and put plain `nn.Linear` layers back (the model's own state-dict names and
    no `lora_` tensors), ready to save as an ordinary checkpoint."""
    merge_lora(model)
    for path, layer in list(model.named_modules(remove_duplicate=False)):
        if isinstance(layer, LoraLinear):
            plain = nn.Linear(
                layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
            )
            plain.weight, plain.bias = layer.weight, layer.bias
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path), child, plain)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora` (exact up to fp32 rounding), so training or swapping adapters can go on."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors alone: `<module path>.lora_A`, `.lora_B` and, for DoRA, `.lora_magnitude`."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model).items():
        for name, param in layer.named_parameters(recurse=False):
            if name.startswith("lora_"):
                out[f"{path}.{name}"] = param.detach()
    return out


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that receive gradients (a shared parameter counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


NameMap = Callable[[str], str] | Mapping[str, str] | None


def _mapper(name_map: NameMap) -> Callable[[str], str]:
    if name_map is None:
        return lambda name: name
    if callable(name_map):
        return name_map
    table = dict(name_map)
    return lambda name: table.get(name, name)


# ---- PEFT's adapter folder -------------------------------------------------------------------------
# A PEFT LoRA folder holds `adapter_config.json` and `adapter_model.safetensors`, whose tensors are named
# `base_model.model.<module path in the HF model>.<suffix>`. The suffixes are data, like interop's
# weight maps; `name_map` turns our module paths into the HF model's.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_SUFFIXES = {
    "lora_A": "lora_A.weight",
    "lora_B": "lora_B.weight",
    "lora_magnitude": "lora_magnitude_vector",
}


def peft_state_dict(model: nn.Module, name_map: NameMap = None) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names (`base_model.model.<hf path>.lora_A.weight`, ...)."""
    to_hf = _mapper(name_map)
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model).items():
        for ours, theirs in PEFT_SUFFIXES.items():
            tensor = getattr(layer, ours)
            if tensor is not None:
                out[f"{PEFT_PREFIX}{to_hf(path)}.{theirs}"] = tensor.detach().contiguous()
    return out


def save_adapter(
    model: nn.Module,
    path: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    name_map: NameMap = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    extra_config: Mapping[str, object] | None = None,
) -> Path:
    """Write the model's adapters as a PEFT LoRA folder that `peft.PeftModel.from_pretrained` loads.
    `extra_tensors` and `extra_config` join the file and the config (e.g. trainable token rows)."""
    layers = lora_layers(model)
    if not layers:
        raise InputError("the model has no LoRA adapters to save — call apply_lora first")
    first = next(iter(layers.values()))
    if any(
        (m.r, m.alpha, m.rslora, m.use_dora) != (first.r, first.alpha, first.rslora, first.use_dora)
        for m in layers.values()
    ):
        raise InputError(
            "the adapters differ in r, alpha or variant — PEFT's folder holds one setting for all"
        )
    if any(m.merged for m in layers.values()):
        raise InputError("the adapters are merged into the weights — call unmerge_lora before save_adapter")
    to_hf = _mapper(name_map)
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({to_hf(p).rsplit(".", 1)[-1] for p in layers}),
        "use_rslora": first.rslora,
        "use_dora": first.use_dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        **(extra_config or {}),
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.to("cpu") for k, v in {**peft_state_dict(model, name_map), **(extra_tensors or {})}.items()
    }
    atomic_write_bytes(folder / ADAPTER_WEIGHTS, safetensors.torch.save(tensors, metadata={"format": "pt"}))
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


def read_adapter_config(path: str | Path) -> LoraConfig:
    """The `LoraConfig` of a PEFT LoRA folder (its targets as PEFT named them)."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise InputError(
            f"{file} does not exist — pass a folder written by save_adapter or PEFT's save_pretrained"
        )
    raw = json.loads(file.read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{file} holds a {raw.get('peft_type')} adapter — only LORA adapters load here")
    if (
        raw.get("bias", "none") != "none"
        or raw.get("fan_in_fan_out")
        or raw.get("rank_pattern")
        or raw.get("alpha_pattern")
    ):
        raise InputError(
            f"{file} uses bias training, fan_in_fan_out or per-layer ranks — save the adapter with plain "
            "LoRA settings (bias='none', one r and alpha for all layers)"
        )
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        targets = ALL_LINEAR if targets == ALL_LINEAR else (targets,)
    return LoraConfig(
        r=int(raw["r"]),
        alpha=float(raw["lora_alpha"]),
        dropout=float(raw.get("lora_dropout", 0.0)),
        targets=tuple(t.rsplit(".", 1)[-1] for t in targets) if not isinstance(targets, str) else targets,
        rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
    )


def load_adapter(
    model: nn.Module, path: str | Path, name_map: NameMap = None, skip: Callable[[str], bool] | None = None
) -> nn.Module:
    """Load a PEFT LoRA folder into `model` (in place): the layers whose tensors the file holds get an
    adapter (the rest of the model frozen), or, if the model already has adapters, their values are
    replaced. A tensor naming no layer, or of the wrong shape, is an error naming it; tensors for which
    `skip(name)` holds are left to the caller (e.g. trainable token rows)."""
    config = read_adapter_config(path)
    file = Path(path) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise InputError(f"{file} does not exist — the adapter folder needs its weights file")
    tensors = safetensors.torch.load_file(str(file))
    to_hf = _mapper(name_map)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    by_hf = {f"{PEFT_PREFIX}{to_hf(n)}": n for n in linear}
    wanted: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if skip is not None and skip(key):
            continue
        module, _, suffix = key.rpartition(".lora_")
        ours = {v: k for k, v in PEFT_SUFFIXES.items()}.get(f"lora_{suffix}")
        if ours is None or module not in by_hf:
            raise InputError(
                f"adapter tensor {key!r} names no linear layer of this model — load it into the model it was "
                "trained for, or pass the name_map that maps our module paths to its names"
            )
        wanted.setdefault(by_hf[module], {})[ours] = tensor
    if not lora_layers(model):
        for p in model.parameters():
            p.requires_grad_(False)
        inject(model, list(wanted), config)
    for path, layer in lora_layers(model).items():
        have = (layer.r, layer.alpha, layer.rslora, layer.use_dora)
        if have != (config.r, config.alpha, config.rslora, config.use_dora):
            raise InputError(
                f"layer {path!r} has an adapter with r, alpha, rslora, use_dora = {have} but the folder's are "
                f"{(config.r, config.alpha, config.rslora, config.use_dora)} — load it into the base model instead"
            )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    for module, found in wanted.items():
        layer = layers.get(module)
        if layer is None:
            raise InputError(f"layer {module!r} has no LoRA adapter — load the adapter into the base model")
        for ours, tensor in found.items():
            target = getattr(layer, ours)
            if target is None or target.shape != tensor.shape:
                shape = None if target is None else tuple(target.shape)
                raise InputError(
                    f"adapter tensor {module}.{ours} has shape {tuple(tensor.shape)} but the model expects "
                    f"{shape} — the adapter was trained for a different model, rank or variant"
                )
            with torch.no_grad():
                target.copy_(tensor)
    return model
