"""The decoder: embeddings, N blocks, final norm, LM head. One block serves every family by config.

Pre-norm (GPT-2 onwards): x = x + attn(norm(x)); x = x + mlp(norm(x)) — the residual stream is never
normalised, which keeps gradients well-behaved in deep stacks. Post-norm (the original transformer):
x = norm(x + attn(x)); x = norm(x + mlp(x)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmstack.config import ModelConfig
from lmstack.errors import InputError
from lmstack.model.attention import Attention, ForwardContext, KVCache, check_attn_impl
from lmstack.model.masks import positions_from_padding
from lmstack.model.mlp import MLP
from lmstack.model.moe import MoE, load_balancing_loss
from lmstack.model.norm import Norm
from lmstack.model.position import alibi_slopes, rope_cos_sin, sinusoidal_embedding


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, attn_impl: str):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.attn_norm = Norm(config)
        self.attn = Attention(config, layer, attn_impl)
        self.mlp_norm = Norm(config)
        self.mlp = MoE(config) if config.is_moe else MLP(config)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        router_logits = None
        if self.pre_norm:
            x = x + self.drop(self.attn(self.attn_norm(x), ctx))
            h = self.mlp(self.mlp_norm(x))
        else:
            x = self.attn_norm(x + self.drop(self.attn(x, ctx)))
            h = self.mlp(x)
        if isinstance(h, tuple):
            h, router_logits = h
        x = x + self.drop(h)
        return (x if self.pre_norm else self.mlp_norm(x)), router_logits


class Transformer(nn.Module):
    """Decoder-only language model: `model(input_ids, ...)` -> logits (B, T, vocab)."""

    def __init__(self, config: ModelConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = (
            nn.Embedding(config.max_seq_len, config.d_model) if config.position == "learned" else None
        )
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(Block(config, i, attn_impl) for i in range(config.n_layers))
        self.norm = Norm(config)
        self.lm_head = (
            None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        # RoPE frequencies and ALiBi slopes are recomputed per call (a few hundred floats) rather than
        # kept as buffers, so `model.to(bfloat16)` cannot round them.
        self.gradient_checkpointing = False
        self.aux_loss: torch.Tensor | None = None

    # ---- configuration at run time ----------------------------------------------------------
    @property
    def attn_impl(self) -> str:
        return self.blocks[0].attn.attn_impl if len(self.blocks) else "sdpa"

    def set_attn_impl(self, impl: str) -> None:
        """Switch between `eager`, `sdpa` and `flash` without touching the weights."""
        check_attn_impl(impl)
        for block in self.blocks:
            block.attn.attn_impl = impl

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel() + (
                self.pos_emb.weight.numel() if self.pos_emb is not None else 0
            )
        return n

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T).

        `positions` (B, T) default to 0..T-1 after what `cache` has seen, or, for a left-padded batch
        given `attention_mask` (B, T: 1 for real tokens of this call), count from each first real
        token. `cache` follows the `KVCache` protocol; the model only reads it and appends to it.
        After the call, `self.aux_loss` holds the MoE load-balancing loss (None for dense models).
        """
        return self.head(
            self.features(input_ids, positions=positions, cache=cache, attention_mask=attention_mask)
        )

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head over final hidden states (B, T, d) -> logits (B, T, vocab)."""
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def features(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, d): the forward pass without the LM head."""
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        c = self.config
        valid = None if attention_mask is None else attention_mask.to(torch.bool)
        plain_causal = positions is None and attention_mask is None and cache is None
        if positions is None:
            offset = cache.seen_tokens if cache is not None else 0
            if attention_mask is not None and offset:
                # each padded row's position depends on its own padding, which only the caller knows
                raise InputError("with a non-empty cache and an attention_mask, pass positions explicitly")
            if attention_mask is not None:
                positions = positions_from_padding(attention_mask)
            else:
                positions = torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)
        if valid is not None and valid.shape != (B, T):
            raise InputError(f"attention_mask shape {tuple(valid.shape)} does not match input_ids {(B, T)}")

        x = self.tok_emb(input_ids)
        if c.embedding_scale != 1.0:
            x = x * torch.tensor(c.embedding_scale, dtype=x.dtype)
        if self.pos_emb is not None:
            if T and int(positions.max()) >= c.max_seq_len:
                raise InputError(
                    f"position {int(positions.max())} is past max_seq_len={c.max_seq_len} of learned position "
                    "embeddings — shorten the input"
                )
            x = x + self.pos_emb(positions)
        elif c.position == "sinusoidal":
            x = x + sinusoidal_embedding(positions, c.d_model, x.dtype)
        x = self.drop(x)
        rope = rope_cos_sin(c, positions, dtype=x.dtype) if c.position == "rope" else None
        alibi = alibi_slopes(c.n_heads).to(x.device) if c.position == "alibi" else None

        ctx = ForwardContext(positions, valid, rope, alibi, cache, plain_causal)
        router_logits = []
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and cache is None:
                x, logits = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x, logits = block(x, ctx)
            if logits is not None:
                router_logits.append(logits)
        self.aux_loss = (
            load_balancing_loss(router_logits, c.n_experts, c.n_experts_per_token, valid)
            if router_logits
            else None
        )
        return self.norm(x)

    # ---- initialisation -----------------------------------------------------------------------
    def reset_parameters(self, std: float = 0.02) -> None:
        """GPT-2 initialisation: N(0, std) weights, zero biases, unit norms, and the residual output
        projections scaled by 1/√(2·n_layers) so the residual stream's variance does not grow with depth."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = (
                    1 / math.sqrt(2 * self.config.n_layers) if name.endswith(("attn.out", ".down")) else 1.0
                )
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Norm):
                module.reset_parameters()


def build_model(
    config: ModelConfig,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_impl: str = "sdpa",
    seed: int | None = None,
) -> Transformer:
    """Build a randomly initialised model; on the `meta` device nothing is allocated or initialised."""
    check_attn_impl(attn_impl)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device(device):
        model = Transformer(config, attn_impl=attn_impl)
    if device.type != "meta":
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model.reset_parameters()
        else:
            model.reset_parameters()
    if dtype is not None:
        model = model.to(dtype)
    return model
