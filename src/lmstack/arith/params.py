"""Exact parameter counts of a decoder `ModelConfig`, by component, without building the model.

What is counted (the layout `lmstack.model` builds, which matches each family's `transformers` class):

* token embedding `vocab_size × d_model`; a learned position table `max_seq_len × d_model` when
  `position == "learned"` (RoPE, ALiBi, sinusoidal and none add no parameters);
* per block: q `d × n_heads·head_dim`, k and v `d × n_kv_heads·head_dim` (so GQA/MQA shrink k and v),
  o `n_heads·head_dim × d`, their biases when `qkv_bias` / `out_bias`; an MLP of two matrices
  (`gelu`, `gelu_tanh`, `relu`) or three (gated: `swiglu`, `geglu`: gate, up, down) of `d × d_ff`, with
  biases when `mlp_bias`; an MoE layer instead holds a bias-free router `d × n_experts` and
  `n_experts` such MLPs; two norms (before attention and before the MLP), LayerNorm = weight + bias,
  RMSNorm = weight only;
* a final norm, and the LM head `d_model × vocab_size`, counted once: zero extra when tied.

Derived totals (definitions used throughout `lmstack.arith`):

* `embedding` = token + position embedding tables (lookups, no matmul FLOPs);
* `lm_head` = the head's own parameters (0 when tied to the token embedding);
* `non_embedding` = total − embedding − lm_head = blocks + final norm (Kaplan et al. 2020's N);
* `active` = parameters a token touches: total minus the `n_experts − k` idle experts per MoE layer
  (embeddings and head included; `active_non_embedding` without them). Equal to total when dense.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmstack.config import ModelConfig

QUANTISABLE = ("q", "k", "v", "o", "mlp")  # the blocks' linear weight matrices


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one transformer block. `mlp`/`mlp_bias` describe the dense MLP or ONE expert."""

    q: int
    k: int
    v: int
    o: int
    q_bias: int
    k_bias: int
    v_bias: int
    o_bias: int
    mlp: int
    mlp_bias: int
    n_experts: int  # 0: dense MLP
    experts_per_token: int
    router: int
    norms: int

    @property
    def attention(self) -> int:
        return self.q + self.k + self.v + self.o + self.attn_bias

    @property
    def attn_bias(self) -> int:
        return self.q_bias + self.k_bias + self.v_bias + self.o_bias

    @property
    def expert(self) -> int:
        """One MLP (the dense one, or one expert), weights and biases."""
        return self.mlp + self.mlp_bias

    @property
    def n_mlps(self) -> int:
        return max(self.n_experts, 1)

    @property
    def n_active_mlps(self) -> int:
        return self.experts_per_token if self.n_experts else 1

    @property
    def total(self) -> int:
        return self.attention + self.n_mlps * self.expert + self.router + self.norms

    @property
    def active(self) -> int:
        return self.attention + self.n_active_mlps * self.expert + self.router + self.norms

    @property
    def linear_weights(self) -> int:
        """Weight matrices of the attention projections and MLPs/experts: what a weight-only
        quantiser (int8/int4/NF4/GGUF) stores in low precision. Biases, norms and the router stay 16-bit."""
        return self.q + self.k + self.v + self.o + self.n_mlps * self.mlp

    @property
    def active_matmul_weights(self) -> int:
        """Weights multiplied per token (2 FLOPs each): projections, the k active MLPs, the router."""
        return self.q + self.k + self.v + self.o + self.n_active_mlps * self.mlp + self.router


@dataclass(frozen=True)
class ParamCounts:
    token_embedding: int
    position_embedding: int
    layer: LayerParams
    n_layers: int
    final_norm: int
    lm_head: int  # 0 when tied
    tied: bool
    d_model: int
    vocab_size: int

    @property
    def embedding(self) -> int:
        return self.token_embedding + self.position_embedding

    @property
    def blocks(self) -> int:
        return self.n_layers * self.layer.total

    @property
    def total(self) -> int:
        return self.embedding + self.blocks + self.final_norm + self.lm_head

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.lm_head

    @property
    def active(self) -> int:
        return self.total - self.n_layers * (self.layer.total - self.layer.active)

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding - self.lm_head

    @property
    def head_matmul_weights(self) -> int:
        """The head multiplies by a vocab × d matrix per token whether or not it is tied."""
        return self.vocab_size * self.d_model

    @property
    def matmul_weights_per_token(self) -> int:
        """Weights each token multiplies by in a forward pass (forward FLOPs ≈ 2× this + attention)."""
        return self.n_layers * self.layer.active_matmul_weights + self.head_matmul_weights

    @property
    def quantisable(self) -> int:
        """All blocks' linear weight matrices (see `LayerParams.linear_weights`)."""
        return self.n_layers * self.layer.linear_weights

    def to_dict(self) -> dict[str, object]:
        layer = self.layer
        return {
            "total": self.total,
            "active": self.active,
            "embedding": self.embedding,
            "lm_head": self.lm_head,
            "non_embedding": self.non_embedding,
            "active_non_embedding": self.active_non_embedding,
            "tied_embeddings": self.tied,
            "components": {
                "token_embedding": self.token_embedding,
                "position_embedding": self.position_embedding,
                "blocks": self.blocks,
                "final_norm": self.final_norm,
                "lm_head": self.lm_head,
            },
            "per_layer": {
                "total": layer.total,
                "active": layer.active,
                "attention": layer.attention,
                "q": layer.q,
                "k": layer.k,
                "v": layer.v,
                "o": layer.o,
                "q_bias": layer.q_bias,
                "k_bias": layer.k_bias,
                "v_bias": layer.v_bias,
                "o_bias": layer.o_bias,
                "mlp": layer.expert * layer.n_mlps,
                "expert": layer.expert if layer.n_experts else 0,
                "n_experts": layer.n_experts,
                "router": layer.router,
                "norms": layer.norms,
            },
            "matmul_weights_per_token": self.matmul_weights_per_token,
            "quantisable": self.quantisable,
        }


def norm_params(config: ModelConfig) -> int:
    """One norm over d_model: LayerNorm has a weight and a bias, RMSNorm a weight only."""
    return config.d_model * (2 if config.norm == "layernorm" else 1)


def layer_params(config: ModelConfig) -> LayerParams:
    c = config
    n_matrices = 3 if c.gated_mlp else 2
    mlp_bias = ((n_matrices - 1) * c.d_ff + c.d_model) if c.mlp_bias else 0  # up (+gate) biases d_ff, down d
    return LayerParams(
        q=c.d_model * c.q_dim,
        k=c.d_model * c.kv_dim,
        v=c.d_model * c.kv_dim,
        o=c.q_dim * c.d_model,
        q_bias=c.q_dim if c.qkv_bias else 0,
        k_bias=c.kv_dim if c.qkv_bias else 0,
        v_bias=c.kv_dim if c.qkv_bias else 0,
        o_bias=c.d_model if c.out_bias else 0,
        mlp=n_matrices * c.d_model * c.d_ff,
        mlp_bias=mlp_bias,
        n_experts=c.n_experts,
        experts_per_token=c.n_experts_per_token if c.n_experts else 1,
        router=c.d_model * c.n_experts,  # bias-free Linear(d_model, n_experts); 0 when dense
        norms=2 * norm_params(c),
    )


def count_params(config: ModelConfig) -> ParamCounts:
    """Exact parameter counts by component (see the module docstring for what each total means)."""
    c = config
    return ParamCounts(
        token_embedding=c.vocab_size * c.d_model,
        position_embedding=c.max_seq_len * c.d_model if c.position == "learned" else 0,
        layer=layer_params(c),
        n_layers=c.n_layers,
        final_norm=norm_params(c),
        lm_head=0 if c.tie_embeddings else c.d_model * c.vocab_size,
        tied=c.tie_embeddings,
        d_model=c.d_model,
        vocab_size=c.vocab_size,
    )


# ---- the textbook approximations, kept so tests can show where they hold and where they drift ----------
def approx_12ld2(d_model: int, n_layers: int, vocab_size: int = 0) -> int:
    """Kaplan et al. 2020's rule: 12·L·d² (4d² attention + 8d² MLP with d_ff = 4d) + V·d (one tied table)."""
    return 12 * n_layers * d_model**2 + vocab_size * d_model
