"""Multi-head attention with GQA/MQA, three interchangeable implementations, and a KV-cache hook.

softmax(QKᵀ/√d_k)·V: scaling by 1/√d_k keeps the logits' variance near 1 so the softmax does not
saturate (seed 001, "Scaled dot-product attention"). Grouped-query attention lets G = H / KV query
heads share one key/value head; the K/V tensors are broadcast over the group, never copied.

Implementations (chosen at build or run time, never saved): `eager` (the formula, and it can return
the attention weights), `sdpa` (PyTorch's fused kernel) and `flash` (our tiled online-softmax, see
flash.py). All three take positions, not masks, and build what they need from `masks.sees`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig
from lmstack.errors import InputError
from lmstack.model.flash import flash_attention
from lmstack.model.masks import attention_mask
from lmstack.model.position import apply_rope

ATTN_IMPLS = ("eager", "sdpa", "flash")


class KVCache(Protocol):
    """What the model asks of a cache; the inference code owns the storage and its policy.

    `update` stores this call's keys and values for layer `layer` at `positions` (B, T), marking
    padding slots invalid with `valid` (B, T) bool or None, and returns every key and value the
    queries of this call may attend to, with their positions and validity: (k, v, k_pos, k_valid)
    shaped (B, KV, S, D), (B, KV, S, D), (B, S), (B, S) or None. `seen_tokens` is the number of
    positions already stored, used as the default offset of a call's positions.
    """

    seen_tokens: int

    def update(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]: ...


def check_attn_impl(impl: str) -> str:
    if impl not in ATTN_IMPLS:
        raise InputError(f"unknown attn_impl {impl!r} — use one of {', '.join(ATTN_IMPLS)}")
    return impl


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None,
    *,
    impl: str = "sdpa",
    causal: bool = True,
    window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    plain_causal: bool = False,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of q (B, H, T, D) over k, v (B, KV, S, D); returns ((B, H, T, D), weights or None).

    `plain_causal` promises that queries and keys are the same positions 0..T-1 with no padding,
    which lets `sdpa` use its mask-free causal kernel. A query that sees no key outputs zeros.
    """
    scale = q.shape[-1] ** -0.5
    if impl == "flash":
        out = flash_attention(
            q,
            k,
            v,
            q_pos,
            k_pos,
            k_valid,
            causal=causal,
            window=window,
            alibi_slopes=alibi_slopes,
            scale=scale,
        )
        return out, None
    if impl == "sdpa" and plain_causal and causal and window is None and alibi_slopes is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), None
    mask = attention_mask(q_pos, k_pos, k_valid, causal=causal, window=window)  # (B, 1, T, S)
    seen = mask.any(-1, keepdim=True)  # (B, 1, T, 1)
    mask = mask | ~seen  # let an isolated query attend somewhere finite; its output is zeroed below
    bias = None
    if alibi_slopes is not None:
        distance = (q_pos[:, None, :, None] - k_pos[:, None, None, :]).to(q.dtype)  # (B, 1, T, S)
        bias = -alibi_slopes.to(q.device, q.dtype)[None, :, None, None] * distance  # (B, H, T, S)
    if impl == "sdpa":
        attn_mask = mask if bias is None else bias.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        return out * seen.to(out.dtype), None
    # eager: the formula, with the query heads grouped so K/V broadcast instead of repeating.
    B, H, T, D = q.shape
    n_kv = k.shape[1]
    qg = q.reshape(B, n_kv, H // n_kv, T, D)
    scores = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * scale  # (B, KV, G, T, S)
    scores = scores.reshape(B, H, T, -1)
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) * seen.to(scores.dtype)
    out = torch.matmul(weights.reshape(B, n_kv, H // n_kv, T, -1), v[:, :, None]).reshape(B, H, T, -1)
    return out, (weights if return_weights else None)


class Attention(nn.Module):
    """Combined QKV projection, RoPE or ALiBi, attention, output projection."""

    def __init__(self, config: ModelConfig, layer: int, attn_impl: str = "sdpa"):
        super().__init__()
        self.config, self.layer = config, layer
        self.attn_impl = check_attn_impl(attn_impl)
        self.qkv = nn.Linear(config.d_model, config.q_dim + 2 * config.kv_dim, bias=config.qkv_bias)
        self.out = nn.Linear(config.q_dim, config.d_model, bias=config.out_bias)
        self.last_weights: torch.Tensor | None = None  # filled when `store_weights` is set (eager only)
        self.store_weights = False

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        alibi_slopes: torch.Tensor | None,
        cache: KVCache | None,
        plain_causal: bool,
    ) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([c.q_dim, c.kv_dim, c.kv_dim], dim=-1)
        q = q.view(B, T, c.n_heads, c.head_dim).transpose(1, 2)  # (B, T, H*D) -> (B, H, T, D)
        k = k.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k_pos, k_valid = positions, valid
        if cache is not None:
            k, v, k_pos, k_valid = cache.update(self.layer, k, v, positions, valid)
            plain_causal = False
        impl = "eager" if self.store_weights else self.attn_impl
        y, weights = attend(
            q, k, v, positions, k_pos, k_valid, impl=impl, window=c.sliding_window,
            alibi_slopes=alibi_slopes, plain_causal=plain_causal, return_weights=self.store_weights,
        )  # fmt: skip
        self.last_weights = weights
        return self.out(y.transpose(1, 2).reshape(B, T, c.q_dim))
