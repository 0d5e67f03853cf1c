"""Model compression: weight-only quantization of a model's linear layers.

`quantize(model, "int8" | "int4" | "nf4")` swaps the projections for `QuantLinear`s in place; the
quantized model saves with `save_pretrained` (the scheme recorded in config.json's
`quantization_config`) and loads back with `from_pretrained` like any other checkpoint.
"""

from __future__ import annotations

from torch import nn

from lmstack.compress.linear import (
    METHODS,
    QuantLinear,
    QuantScheme,
    is_quantized,
    prepare_quantized,
    quantization_config,
    swap,
)


def quantize(
    model: nn.Module, method: str, *, group_size: int | None = None, include_head: bool = False
) -> nn.Module:
    """Quantize `model`'s attention and MLP projections (and the untied LM head with `include_head`)
    in place with `method`; `group_size` is int4's group (default 128) or NF4's block (default 64)."""
    return swap(model, QuantScheme.make(method, group_size), include_head=include_head)


__all__ = [
    "METHODS",
    "QuantLinear",
    "QuantScheme",
    "is_quantized",
    "prepare_quantized",
    "quantization_config",
    "quantize",
    "swap",
]
