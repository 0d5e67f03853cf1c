"""Matmul FLOPs of a forward pass, exact for a `ModelConfig`.

Convention (the one `torch.utils.flop_counter.FlopCounterMode` uses, so tests can compare): only
matrix multiplications count, 2 FLOPs per multiply-add; bias adds, norms, softmax, activations,
RoPE and the embedding lookup are not counted (they are O(s·d), not O(s·d²)). MACs are never reported.

For one sequence of `s` tokens and one block:

* projections: 2·s·d·(q_dim + 2·kv_dim) for q, k, v and 2·s·q_dim·d for o;
* attention core: scores QKᵀ and the weighted sum of values, each 2·n_heads·head_dim·P, where P is
  the number of (query, key) pairs computed: with `causal=False` (the default) P = s², which is what
  an eager or masked implementation multiplies even though the mask zeroes half of it; with
  `causal=True` P = s(s+1)/2, or Σ min(i+1, window) with a sliding window, which is what a causal
  kernel that skips masked tiles (FlashAttention) does;
* MLP: 2·s·(2 or 3)·d·d_ff; an MoE layer runs its router (2·s·d·E) and only the k chosen experts;
* LM head: 2·s·d·vocab (tied or not: the multiplication happens either way).

For MHA the attention part is the textbook 8sd² + 4s²d per layer (`seed_attention_layer_flops`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lmstack.arith.params import count_params
from lmstack.config import ModelConfig
from lmstack.errors import InputError


@dataclass(frozen=True)
class ForwardFlops:
    """Matmul FLOPs of one forward pass over `context` tokens (all layers), by component."""

    context: int
    causal: bool
    attention_projections: int
    attention_scores: int
    attention_values: int
    mlp: int
    router: int
    lm_head: int

    @property
    def total(self) -> int:
        return (
            self.attention_projections
            + self.attention_scores
            + self.attention_values
            + self.mlp
            + self.router
            + self.lm_head
        )

    @property
    def per_token(self) -> float:
        return self.total / self.context

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "total": self.total, "per_token": self.per_token}


def attended_pairs(context: int, *, causal: bool = False, window: int | None = None) -> int:
    """(query, key) pairs whose score is computed for `context` tokens.

    Non-causal counting is the full s² (what eager attention multiplies before masking). Causal
    counting keeps the pairs a query may see: key j is visible to query i when i - window < j <= i,
    the sliding-window convention of `transformers`' Mistral and of `lmstack.config`.
    """
    s = context
    if not causal:
        return s * s
    if window is None or window >= s:
        return s * (s + 1) // 2
    w = window
    return w * (w + 1) // 2 + (s - w) * w  # first w queries see 1..w keys, the rest exactly w


def forward_flops(config: ModelConfig, context: int, *, causal: bool = False) -> ForwardFlops:
    """Matmul FLOPs of one forward pass over one sequence of `context` tokens (see module docstring)."""
    if context < 1:
        raise InputError(f"context must be >= 1 token, got {context}")
    c, s = config, context
    layer = count_params(c).layer
    pairs = attended_pairs(s, causal=causal, window=c.sliding_window if causal else None)
    L = c.n_layers
    return ForwardFlops(
        context=s,
        causal=causal,
        attention_projections=L * 2 * s * (layer.q + layer.k + layer.v + layer.o),
        attention_scores=L * 2 * c.n_heads * c.head_dim * pairs,
        attention_values=L * 2 * c.n_heads * c.head_dim * pairs,
        mlp=L * 2 * s * layer.n_active_mlps * layer.mlp,
        router=L * 2 * s * layer.router,
        lm_head=2 * s * c.d_model * c.vocab_size,
    )


def forward_per_token(config: ModelConfig, context: int, *, causal: bool = False) -> float:
    """`forward_flops(config, context).total / context` — the `flops.forward_per_token` of the report."""
    return forward_flops(config, context, causal=causal).per_token


def decode_flops_per_token(config: ModelConfig, context: int) -> int:
    """Matmul FLOPs to produce one token that attends to `context` cached keys (itself included).

    2·(weights multiplied per token) + 4·n_heads·head_dim·keys per layer, keys capped at the window.
    """
    p = count_params(config)
    keys = min(context, config.sliding_window) if config.sliding_window else context
    attention = config.n_layers * 4 * config.n_heads * config.head_dim * keys
    return 2 * p.matmul_weights_per_token + attention


def training_flops_exact(config: ModelConfig, context: int, tokens: float, *, causal: bool = False) -> float:
    """Forward + backward = 3 × forward FLOPs (the backward computes two matmuls per forward matmul:
    gradients w.r.t. inputs and w.r.t. weights), for `tokens` tokens in sequences of `context`."""
    return 3 * forward_per_token(config, context, causal=causal) * tokens


def training_flops_6nd(n_params: float, tokens: float) -> float:
    """Kaplan et al. 2020 / Hoffmann et al. 2022: C ≈ 6·N·D (2ND forward + 4ND backward, attention ignored)."""
    return 6 * n_params * tokens


def seed_attention_layer_flops(context: int, d_model: int) -> int:
    """Textbook: one MHA layer = 8·s·d² (q, k, v, o projections) + 4·s²·d (QKᵀ and attn×V), full s²."""
    return 8 * context * d_model**2 + 4 * context**2 * d_model
