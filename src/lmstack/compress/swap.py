"""Quantizing a model: which linears become `QuantLinear`s, and the record in config.json.

`swap(model, scheme)` replaces the attention and MLP projections (and, if asked, the LM head) in
place. The scheme is a property of the checkpoint, not of its file name: `quantization_config(model)`
is what `save_pretrained` writes into config.json, and `prepare_quantized(model, config)` rebuilds
the empty quantized modules on a meta-built model so the loader can assign the saved tensors to them.
Either way the model then gets its decode-time fusions (`compress.decode.prepare_decode`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lmstack.compress.decode import prepare_decode
from lmstack.compress.linear import QuantLinear, QuantScheme
from lmstack.errors import InputError
from lmstack.quant.integer import INT4_GROUP_SIZES

QUANT_METHOD = "lmstack"  # the `quant_method` of config.json's quantization_config
# the projections a quantizer targets; embeddings, norms, MoE routers and (by default) the head stay float
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def target_linears(model: nn.Module, *, include_head: bool = False) -> Iterator[tuple[str, nn.Linear]]:
    """(name, module) of every projection a quantizer replaces, in model order."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (leaf in TARGETS and name.startswith("blocks.")) or (include_head and name == "lm_head"):
            yield name, module


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def swap(
    model: nn.Module,
    scheme: QuantScheme,
    *,
    include_head: bool = False,
    head_scheme: QuantScheme | None = None,
) -> nn.Module:
    """Replace the model's projections by `QuantLinear`s of `scheme`, in place; returns the model.

    With `include_head`, the LM head is quantized too. A head tied to the token embedding is
    quantized from the shared matrix and the tie ends: the embedding lookup keeps the float matrix
    (a lookup reads one row, so its bytes do not matter), the logits come from the quantized copy —
    what llama.cpp's Q8_0/Q4_0 files do with a tied `token_embd`, and on a small model with a large
    vocabulary the head is the largest matrix a decode step reads. The checkpoint then holds both.
    `head_scheme` quantizes the head differently from the blocks (default: `scheme`).

    Every module is checked before any is replaced, so a refused call leaves the model as it was."""
    if is_quantized(model):
        method = next(m.scheme.method for m in model.modules() if isinstance(m, QuantLinear))
        raise InputError(f"the model is already quantized ({method}) — quantize its float checkpoint instead")
    targets = [
        (name, linear, head_scheme if name == "lm_head" and head_scheme is not None else scheme)
        for name, linear in target_linears(model, include_head=include_head)
    ]
    for name, linear, s in targets:
        if s.method == "int4" and linear.in_features % s.group_size:
            fits = [g for g in INT4_GROUP_SIZES if linear.in_features % g == 0]
            fix = f"use --group-size {fits[-1]}" if fits else "use int8 or nf4"
            raise InputError(
                f"int4 group size {s.group_size} does not divide the input width "
                f"{linear.in_features} of {name} — {fix}"
            )
    for name, linear, s in targets:
        _replace(model, name, QuantLinear.from_linear(linear, s))
    prepare_decode(model)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


# ---- the record in config.json --------------------------------------------------------------------
def quantization_config(model: nn.Module) -> dict[str, Any] | None:
    """config.json's `quantization_config` for a quantized model (None for a float one)."""
    quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not quantized:
        return None
    schemes = {m.scheme for n, m in quantized if n != "lm_head"}
    head = next((m.scheme for n, m in quantized if n == "lm_head"), None)
    if len(schemes) > 1:
        raise InputError("the model mixes quantization schemes — quantize it with one method")
    scheme = schemes.pop() if schemes else head
    assert scheme is not None
    record = {
        "quant_method": QUANT_METHOD,
        "scheme": scheme.method,
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "modules": [n for n, _ in quantized],
    }
    if head is not None and head != scheme:  # the head in its own scheme (`quantize(include_head="int8")`)
        record["head"] = {"scheme": head.method, "bits": head.bits, "group_size": head.group_size}
    return record


def prepare_quantized(model: nn.Module, config: dict[str, Any], *, dtype: torch.dtype) -> None:
    """Replace the modules a `quantization_config` names by empty `QuantLinear`s on the model's
    device (meta while loading), ready to have the checkpoint's tensors assigned."""
    if not isinstance(config, dict) or config.get("quant_method") != QUANT_METHOD:
        method = config.get("quant_method") if isinstance(config, dict) else config
        raise InputError(
            f"config.json quantization_config has quant_method {method!r}, which lmstack cannot load — "
            f"load a float checkpoint or one `lmstack quantize` wrote (quant_method {QUANT_METHOD!r})"
        )
    try:
        scheme = QuantScheme.make(config["scheme"], config.get("group_size"))
        head = config.get("head")
        head_scheme = scheme if head is None else QuantScheme.make(head["scheme"], head.get("group_size"))
        modules = list(config["modules"])
    except (KeyError, TypeError) as exc:
        raise InputError(
            f"config.json quantization_config lacks {exc} — re-save the model with `lmstack quantize`"
        ) from None
    for name in modules:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise InputError(
                f"config.json quantization_config names module {name!r}, which is not a linear layer of "
                "this model — the config does not match the checkpoint; re-save it"
            )
        device = linear.weight.device
        _replace(
            model,
            name,
            QuantLinear(
                linear.in_features,
                linear.out_features,
                head_scheme if name == "lm_head" else scheme,
                bias=linear.bias is not None,
                device=device,
                dtype=dtype,
            ),
        )
    prepare_decode(model)
