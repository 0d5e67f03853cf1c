"""Model compression: weight-only quantization of a model's linear layers.

  linear   QuantLinear: one layer's int8 / int4 / NF4 matrix and its products (our kernels on CPU)
  swap     which linears a model quantizes, and the record in config.json that loads it back
  decode   the decode step past the kernel: fused q,k,v / gate,up products, a 16-bit float head
  kernels  the C kernels; cuda: PyTorch's int4 kernel on CUDA, self-checked

`quantize(model, "int8" | "int4" | "nf4")` swaps the projections for `QuantLinear`s in place; the
quantized model saves with `save_pretrained` (the scheme recorded in config.json's
`quantization_config`) and loads back with `from_pretrained` like any other checkpoint.
"""

from __future__ import annotations

from torch import nn

from lmstack.compress.linear import METHODS, QuantLinear, QuantScheme
from lmstack.compress.swap import is_quantized, prepare_quantized, quantization_config, swap


def quantize(
    model: nn.Module, method: str, *, group_size: int | None = None, include_head: bool | str = False
) -> nn.Module:
    """Quantize `model`'s attention and MLP projections in place with `method`; `group_size` is int4's
    group (default 128) or NF4's block (default 64). `include_head` quantizes the LM head too: True
    with `method`, or a method name for the head alone (e.g. int4 blocks with an "int8" head, as
    llama.cpp's Q4_0 files keep an 8-bit head); a head tied to the embedding is quantized from the
    shared matrix and the embedding stays float."""
    scheme = QuantScheme.make(method, group_size)
    if isinstance(include_head, str):
        head = QuantScheme.make(include_head) if include_head != method else scheme
        return swap(model, scheme, include_head=True, head_scheme=head)
    return swap(model, scheme, include_head=include_head)


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
