"""QLoRA (Dettmers et al. 2023): LoRA adapters on a frozen base stored in 4-bit NormalFloat.

    y = dequant(W_nf4) x + b + s · B A x

The frozen base costs ~4.13 bits per weight instead of 16 or 32: NF4 with block 64 and double
quantisation of the absmax constants (`lmstack.quant.nf4`, held by `compress.linear.QuantLinear`).
Every linear layer but the output layer `lm_head` is stored this way, as bitsandbytes does when
`transformers` loads a model in 4 bits; embeddings and norms stay in float.

Each step decodes W to the compute dtype (the autocast dtype, else the input's) on the fly. The
gradient with respect to the input needs W again; `NF4Linear`'s backward decodes it a second time
instead of keeping the forward's float copy (bitsandbytes' `MatMul4Bit` does the same), so no float
copy of a frozen matrix outlives its own matmul. Only the adapters receive gradients.

A QLoRA model is built from a float one: `apply_qlora` adds the adapters (`lora.apply_lora`, so a
seed gives the same A matrices as a LoRA run) and then `quantize_base` replaces each frozen linear:
an `nn.Linear` by an `NF4Linear`, a `LoraLinear` by a `QLoraLinear` around one. Quantisation is a
deterministic function of the weights, so a resumed run rebuilds exactly the same base.

A merge cannot fold the update back into 4 bits without rounding it away, so `dequantize_base` first
turns the NF4 layers into float ones holding the decoded weights — the base the adapters were trained
on — and the ordinary LoRA merge (`lora.unload_lora`) then adds s·BA (as PEFT's merge on a 4-bit
base does before re-quantising; we save the sum in 16 or 32 bits instead).

A width that is not a multiple of the block needs nothing special: blocks run over the flattened
matrix and the last one may be short, as in bitsandbytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.atomic import atomic_write_text
from lmstack.compress.linear import QuantLinear, QuantScheme
from lmstack.compress.swap import is_quantized
from lmstack.errors import InputError
from lmstack.finetune.lora import OUTPUT_LAYER, LoraConfig, LoraLinear, apply_lora, lora_layers

NF4_BLOCK = 64
NF4_SCHEME = QuantScheme("nf4", NF4_BLOCK)
# Written beside a QLoRA adapter: how its base was quantised, in the keys of transformers'
# `BitsAndBytesConfig`, so `BitsAndBytesConfig(**json)` loads the same base for PEFT.
BASE_QUANTIZATION = "base_quantization.json"
BNB_CONFIG = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "llm_int8_skip_modules": [OUTPUT_LAYER],
}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _NF4Matmul(torch.autograd.Function):
    """x Wᵀ with W decoded from NF4 in forward and decoded again in backward (nothing float saved)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        return F.linear(x.to(dtype), layer.dequantize(dtype))  # (..., d_in) -> (..., d_out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        w = ctx.layer.dequantize(ctx.dtype)
        return (grad.to(ctx.dtype) @ w).to(ctx.x_dtype), None, None  # (..., d_out) -> (..., d_in)


class NF4Linear(QuantLinear):
    """A frozen NF4 `QuantLinear` for training through: its backward gives the input's gradient by
    decoding W again, never keeping a float W (module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):  # the matmul runs in `dtype`, chosen here
            y = _NF4Matmul.apply(x, self, dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _copy_adapter(dst: LoraLinear, src: LoraLinear) -> None:
    """Give `dst` the very adapter of `src` (its tensors, not copies) and its settings."""
    for name in ("r", "alpha", "rslora", "use_dora", "scale"):
        setattr(dst, name, getattr(src, name))
    dst.lora_dropout = src.lora_dropout
    dst.lora_A, dst.lora_B, dst.lora_magnitude = src.lora_A, src.lora_B, src.lora_magnitude
    dst.merged = False


class QLoraLinear(LoraLinear):
    """`LoraLinear`'s adapter math on an `NF4Linear` base (`base_layer`): W is decoded when needed.

    It cannot merge in place (4 bits cannot hold W + sBA); `dequantize_base` turns it back into a
    `LoraLinear` on the decoded weights, which can."""

    def __init__(self, adapted: LoraLinear, base: NF4Linear) -> None:
        nn.Module.__init__(self)  # not LoraLinear.__init__: the adapter is `adapted`'s, not a new one
        if adapted.merged:
            raise InputError("the adapter is merged into its weight — unmerge it before quantizing the base")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_layer = base
        self.bias = base.bias
        _copy_adapter(self, adapted)

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.dequantize()

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def merge(self) -> None:
        raise InputError(
            "an adapter on an NF4 base cannot be merged in place — dequantize the base first "
            "(lmstack.finetune.qlora.merge_qlora, or `lmstack merge`)"
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base nf4"


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _frozen_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every (path, linear layer) QLoRA stores in NF4: all but the output layer, shared ones under each path."""
    return [
        (path, m)
        for path, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, nn.Linear)
        and not isinstance(m, QLoraLinear)
        and path.rsplit(".", 1)[-1] != OUTPUT_LAYER
    ]


def _check_float(model: nn.Module) -> None:
    if is_quantized(model):
        raise InputError(
            "the model is already quantized — QLoRA quantizes the base itself; start from the float checkpoint"
        )


def quantize_base(model: nn.Module) -> nn.Module:
    """Store the model's frozen linear layers in NF4 (in place; module doc): a `LoraLinear` becomes a
    `QLoraLinear` with the same adapter tensors, any other `nn.Linear` but `lm_head` an `NF4Linear`.
    The float weights are released as each layer is replaced."""
    _check_float(model)
    done: dict[int, nn.Module] = {}
    for path, linear in _frozen_linears(model):
        if id(linear) not in done:
            base = NF4Linear.from_linear(linear, NF4_SCHEME)
            base.requires_grad_(False)
            done[id(linear)] = QLoraLinear(linear, base) if isinstance(linear, LoraLinear) else base
        _set(model, path, done[id(linear)])
    return model


def apply_qlora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Freeze `model`, add fresh adapters (`apply_lora`) and store the base in NF4 (in place). DoRA's
    magnitudes start at the row norms of the decoded base, so step 0 equals the NF4 base exactly."""
    _check_float(model)
    apply_lora(model, config)
    quantize_base(model)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if layer.lora_magnitude is not None:
                w = layer.base_weight().to(layer.lora_magnitude.dtype)
                layer.lora_magnitude.copy_(torch.linalg.vector_norm(w, dim=1))
    return model


def _float_linear(layer: QuantLinear) -> nn.Linear:
    """A frozen `nn.Linear` holding `layer`'s decoded weight (and its bias), in the layer's float dtype."""
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight = nn.Parameter(layer.dequantize(), requires_grad=False)
    plain.bias = layer.bias
    return plain


def dequantize_base(model: nn.Module) -> nn.Module:
    """Undo `quantize_base` onto the decoded weights (in place): each `NF4Linear` becomes an
    `nn.Linear` holding dequant(W_nf4), each `QLoraLinear` a `LoraLinear` with the same adapter."""
    done: dict[int, nn.Module] = {}
    adapted: list[str] = []  # QLoraLinear paths: their `base_layer` goes with them
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if any(path.startswith(f"{p}.") for p in adapted):
            continue
        if id(module) in done:
            _set(model, path, done[id(module)])
            adapted += [path] if isinstance(module, QLoraLinear) else []
        elif isinstance(module, QLoraLinear):
            adapted.append(path)
            plain = _float_linear(module.base_layer)
            layer = LoraLinear(nn.Linear(1, 1, device="meta"), module.r, module.alpha)  # no init drawn
            layer.in_features, layer.out_features = plain.in_features, plain.out_features
            layer.weight, layer.bias = plain.weight, plain.bias
            _copy_adapter(layer, module)
            done[id(module)] = layer
            _set(model, path, layer)
        elif isinstance(module, NF4Linear):
            done[id(module)] = _float_linear(module)
            _set(model, path, done[id(module)])
    return model


def merge_qlora(model: nn.Module) -> nn.Module:
    """Fold the adapters of a QLoRA model into its decoded base and return plain float linear layers:
    dequant(W_nf4) + sBA (module doc). In place."""
    from lmstack.finetune.lora import unload_lora

    return unload_lora(dequantize_base(model))


def nf4_layers(model: nn.Module) -> dict[str, NF4Linear]:
    """Each distinct NF4-stored base layer under its first module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}


# ---- the record beside the adapter ------------------------------------------------------------------
def write_base_quantization(folder: Path) -> None:
    atomic_write_text(folder / BASE_QUANTIZATION, json.dumps(BNB_CONFIG, indent=2) + "\n")


def has_nf4_base(adapter: str | Path) -> bool:
    """Whether the adapter folder was trained on an NF4 base (QLoRA); checks the record is ours."""
    file = Path(adapter) / BASE_QUANTIZATION
    if not file.is_file():
        return False
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if record != BNB_CONFIG:
        raise InputError(
            f"{file} does not describe NF4 with double quantisation ({json.dumps(BNB_CONFIG)}) — "
            "it was not written by lmstack's QLoRA; remove it to treat the adapter as plain LoRA"
        )
    return True


def check_float_base(folder: Path) -> None:
    """Refuse a checkpoint folder that is already quantized (its config.json has quantization_config)."""
    config_file = Path(folder) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the loader reports a missing or broken config.json with its own message
    if isinstance(config, dict) and config.get("quantization_config"):
        method = config["quantization_config"]
        method = method.get("scheme") or method.get("quant_method") if isinstance(method, dict) else method
        raise InputError(
            f"{folder} is already quantized ({method}) — QLoRA stores the base in NF4 itself; "
            "give the float (16- or 32-bit) checkpoint it was made from"
        )
