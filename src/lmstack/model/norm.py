"""LayerNorm and RMSNorm, including Gemma's `1 + weight` variant.

RMSNorm (Zhang & Sennrich 2019) drops LayerNorm's mean subtraction and bias: x / rms(x) · g. It is
computed in float32 and cast back, as Llama does, because the mean of squares overflows in fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig


class Norm(nn.Module):
    def __init__(self, config: ModelConfig, dim: int | None = None):
        super().__init__()
        dim = dim or config.d_model
        self.kind, self.eps, self.unit_offset = config.norm, config.norm_eps, config.norm_unit_offset
        # with a unit offset the effective gain is 1 + weight, so an untrained weight starts at 0
        self.weight = nn.Parameter(torch.zeros(dim) if self.unit_offset else torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if self.kind == "layernorm" else None

    def gain(self) -> torch.Tensor:
        return 1.0 + self.weight.float() if self.unit_offset else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:], self.gain().to(x.dtype), self.bias, self.eps)
        # one fused op, bit-equal to h · rsqrt(mean(h²) + eps) in float32: a decode step of a deep
        # model runs two norms per layer on one token, where each extra op is pure dispatch cost
        if not self.unit_offset and x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        h = F.rms_norm(x.float(), x.shape[-1:], None, self.eps)
        if self.unit_offset:  # Gemma multiplies in float32 before casting back
            return (h * self.gain()).type_as(x)
        return self.weight * h.type_as(x)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
