"""Position-wise feed-forward networks: plain (GELU, tanh-GELU, ReLU) and gated (SwiGLU, GeGLU).

A gated MLP computes down(act(gate(x)) ⊙ up(x)) (Shazeer 2020, "GLU Variants Improve Transformer");
it has three matrices instead of two, which is why Llama's d_ff is ~8/3·d rather than 4·d.
`geglu` uses the tanh approximation of GELU, as Gemma does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, bias: bool | None = None):
        super().__init__()
        bias = config.mlp_bias if bias is None else bias
        self.act = ACTIVATIONS[config.mlp]
        self.gate = nn.Linear(config.d_model, config.d_ff, bias=bias) if config.gated_mlp else None
        self.up = nn.Linear(config.d_model, config.d_ff, bias=bias)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=bias)
        # a fused product of gate and up (set by `compress` for quantized layers): an object with
        # `serves(gate, up)` and a call x -> [gate(x) | up(x)]
        self.fused_gate_up = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.down(self.act(self.up(x)))
        fused = self.fused_gate_up
        if fused is not None and fused.serves(self.gate, self.up):
            gate_up = fused(x)
            d_ff = gate_up.shape[-1] // 2
            return self.down(self.act(gate_up[..., :d_ff]) * gate_up[..., d_ff:])
        return self.down(self.act(self.gate(x)) * self.up(x))
