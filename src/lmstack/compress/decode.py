"""A quantized model's decode step, past the kernel: fused projections and a 16-bit float head.

A deep, thin model's decode step is mostly small matrix-vector products and the per-call work around
them, and a small model's tied head is the largest matrix it reads. So, on CPU:

  FusedQuant   the int8/int4 `QuantLinear`s that read one input (attention's q, k, v; a gated MLP's
               gate, up) multiplied as one stacked matrix: one kernel call, one pass over the weights
  DecodeHead   the float LM head multiplied by a bfloat16 copy of its weight at decode-sized batches

`prepare_decode(model)` installs both; `compress.swap` calls it after quantizing or loading a model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmstack.compress import kernels
from lmstack.compress.linear import QuantLinear, packed_matmul
from lmstack.model.attention import Attention
from lmstack.model.mlp import MLP

# rows (tokens) up to which the float head multiplies by its bfloat16 copy; past a few rows the
# float32 weight and PyTorch's tiled matmul win
SMALL_BATCH = 8


class FusedQuant:
    """QuantLinears that read the same input — attention's q, k, v; a gated MLP's gate and up —
    multiplied by our kernel as one matrix, their rows stacked: one call and one pass over the
    weights instead of two or three (a deep, thin model's decode step is mostly such small calls).
    The modules stay in place; the owner asks `serves(...)` with its current modules, so replacing
    one (a LoRA wrapper) turns the fused product off. Batches our kernels do not take run the
    modules one by one. The stack is built on first use from the modules' packed copies, which then
    become views into it (the weights stay resident once), and is rebuilt when a module's tensors
    change: replaced, or their codes or scales written in place."""

    def __init__(self, modules: tuple[QuantLinear, ...]):
        self.modules = modules
        self._packed: tuple[tuple, kernels.PackedInt8 | kernels.PackedInt4, torch.Tensor | None] | None = None

    @classmethod
    def of(cls, *modules: nn.Module | None) -> FusedQuant | None:
        """A fused product of `modules`, or None where they are not int8/int4 QuantLinears of one scheme."""
        if not all(isinstance(m, QuantLinear) for m in modules):
            return None
        first = modules[0]
        if first.scheme.method not in ("int8", "int4") or any(
            m.scheme != first.scheme or m.in_features != first.in_features for m in modules
        ):
            return None
        if any(m.out_features % kernels.ROWS for m in modules[:-1]):  # the stack would pad mid-way
            return None
        return cls(modules)

    def serves(self, *modules: nn.Module) -> bool:
        return len(modules) == len(self.modules) and all(a is b for a, b in zip(modules, self.modules))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.modules[0]._uses_own_kernel(x):
            return torch.cat([m(x) for m in self.modules], dim=-1)
        packs = [m._own_weights() for m in self.modules]
        key = tuple(m._own_stamp for m in self.modules)  # each module's stamp, just checked
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, *self._stack(packs))
        return packed_matmul(x, self._packed[1], self._packed[2])

    def _stack(
        self, packs: list[kernels.PackedInt8 | kernels.PackedInt4]
    ) -> tuple[kernels.PackedInt8 | kernels.PackedInt4, torch.Tensor | None]:
        """The modules' packed copies concatenated (blocks of rows are independent, and every module
        but the last has whole blocks), each module's copy then a view into the stack: one copy."""
        stacked, views = kernels.concat(packs)
        for m, view in zip(self.modules, views):
            m._own = view
        ms = self.modules
        if all(m.bias is None for m in ms):
            return stacked, None
        bias = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in ms]
        return stacked, torch.cat([b.detach().float() for b in bias])


def fuse_quantized(model: nn.Module) -> int:
    """Give every attention whose q, k, v (and every gated MLP whose gate, up) are int8/int4
    QuantLinears a `FusedQuant` of them; returns how many were fused."""
    fused = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_qkv = FusedQuant.of(module.q, module.k, module.v) or module.fused_qkv
            fused += isinstance(module.fused_qkv, FusedQuant)
        elif isinstance(module, MLP) and module.gate is not None:
            module.fused_gate_up = FusedQuant.of(module.gate, module.up)
            fused += module.fused_gate_up is not None
    return fused


class DecodeHead(nn.Linear):
    """The float LM head of a quantized model (the head the quantizer leaves in 16/32-bit): the same
    `nn.Linear` — same parameters, tied to the embedding or not, same state dict — that multiplies a
    decode-sized batch on CPU by a bfloat16 copy of its weight with our kernel (float32 activations
    and sums). A tied head of a small model is the largest matrix a decode step reads (GPT-2's is
    154 MB in float32 against 85 MB for all its int8 blocks); at 16 bits it costs half. The copy
    (half the head's size, built on first use, never saved) is rebuilt when the weight changes;
    larger batches, gradients and other devices use the float32 weight."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._copy: tuple[tuple[int, int], kernels.PackedBF16] | None = None  # (weight's identity, copy)

    @classmethod
    def wrap(cls, linear: nn.Linear) -> DecodeHead:
        """A DecodeHead holding `linear`'s own parameters (nothing is copied or allocated)."""
        head = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        head.weight = linear.weight
        head.bias = linear.bias
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            x.device.type != "cpu"
            or w.device.type != "cpu"
            or x.numel() > SMALL_BATCH * self.in_features
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            or not kernels.available()
        ):
            return super().forward(x)
        key = (w.data_ptr(), w._version)
        if self._copy is None or self._copy[0] != key:
            self._copy = (key, kernels.pack_bf16(w))
        return kernels.bf16_matmul(x, self._copy[1], self.bias).to(x.dtype)


def use_decode_head(model: nn.Module) -> None:
    """Make a quantized model's float `lm_head` a `DecodeHead` (no-op without a plain linear head)."""
    head = getattr(model, "lm_head", None)
    if type(head) is nn.Linear:
        model.lm_head = DecodeHead.wrap(head)


def prepare_decode(model: nn.Module) -> None:
    """Fuse the model's int8/int4 projections and give its float head a bfloat16 decode copy."""
    use_decode_head(model)
    fuse_quantized(model)
