"""Multi-head attention with GQA/MQA, three interchangeable implementations, and a KV-cache hook.

softmax(QKᵀ/√d_k)·V: scaling by 1/√d_k keeps the logits' variance near 1 so the softmax does not
saturate (Vaswani et al. 2017, scaled dot-product attention). Grouped-query attention lets G = H / KV query
heads share one key/value head; the K/V tensors are broadcast over the group, never copied.

Implementations (chosen at build or run time, never saved): `eager` (the formula, and it can return
the attention weights), `sdpa` (PyTorch's fused kernel) and `flash` (our tiled online-softmax, see
flash.py). All three take positions, not masks, and build what they need from `masks.sees`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig
from lmstack.errors import InputError
from lmstack.model.flash import flash_attention
from lmstack.model.masks import visibility
from lmstack.model.position import apply_rope

ATTN_IMPLS = ("eager", "sdpa", "flash")


class KVCache(Protocol):
    """What the model asks of a cache; the inference code owns the storage and its policy.

    One forward call is one `begin` then one `update` per layer, in layer order:

    - `begin(positions, valid)` plans the call once, before the first block: `positions` (B, T) are
      the absolute positions of this call's tokens and `valid` (B, T) bool or None marks padding. The
      cache reserves room (raising before anything is written when it has none), records where each
      new key goes, works out the key positions and validity every layer will attend over, and
      advances `seen_tokens` by T.
    - `update(layer, k, v)` stores layer `layer`'s new keys and values (B, KV, T, D) where `begin`
      planned and returns every key and value this call's queries may attend to, with their
      positions and validity: (k, v, k_pos, k_valid) shaped (B, KV, S, D), (B, KV, S, D), (B, S),
      (B, S) or None. Every layer of one call gets the same k_pos and k_valid.

    `seen_tokens` is the number of slots already stored per row, the default offset of a call's
    positions. A fixed per-request cache fits the same protocol: cross-attention keys and values
    computed once from an encoder's output are stored at construction; its `begin` records nothing
    and its `update` ignores the k, v it is handed and returns the stored ones with their positions.
    """

    seen_tokens: int

    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None) -> None: ...

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
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
    masks: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of q (B, H, T, D) over k, v (B, KV, S, D); returns ((B, H, T, D), weights or None).

    `plain_causal` promises that queries and keys are the same positions 0..T-1 with no padding,
    which lets `sdpa` use its mask-free causal kernel. A query that sees no key outputs zeros.
    `masks` is `masks.visibility(q_pos, k_pos, k_valid, ...)` when the caller already built it.
    `segments` (B, T) marks packed documents (queries and keys the same tokens): a query sees only
    keys of its own segment.
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
            segments=segments,
        )
        return out, None
    if (
        impl == "sdpa"
        and plain_causal
        and causal
        and window is None
        and alibi_slopes is None
        and segments is None
    ):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), None
    if masks is None:
        masks = visibility(q_pos, k_pos, k_valid, causal=causal, window=window, segments=segments)
    mask, seen = masks
    bias = None
    if alibi_slopes is not None:
        distance = (q_pos[:, None, :, None] - k_pos[:, None, None, :]).to(q.dtype)  # (B, 1, T, S)
        bias = -alibi_slopes.to(q.device, q.dtype)[None, :, None, None] * distance  # (B, H, T, S)
    if impl == "sdpa":
        attn_mask = mask
        if bias is not None:
            attn_mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        return (out if seen is None else out * seen.to(out.dtype)), None
    # eager: the formula. The G query heads sharing a key/value head are stacked as G·T rows, so each
    # K/V head is multiplied once, neither repeated nor broadcast (a broadcast matmul copies it G times).
    B, H, T, D = q.shape
    n_kv = k.shape[1]
    qg = q.reshape(B, n_kv, (H // n_kv) * T, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # (B, KV, G·T, S)
    scores = scores.view(B, H, T, -1)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if seen is not None:
        weights = weights * seen.to(scores.dtype)
    out = torch.matmul(weights.reshape(B, n_kv, (H // n_kv) * T, -1), v).reshape(B, H, T, -1)
    return out, (weights if return_weights else None)


@dataclass
class ForwardContext:
    """What every layer of one forward call shares: query positions and validity, the RoPE tables or
    ALiBi slopes, the cache, whether queries see only earlier keys (`causal`: decoders set it, an
    encoder clears it), and the attention mask, which is built by the first layer and reused.
    `plain_causal` promises positions 0..T-1 with no padding and no cache (see `attend`). `segments`
    (B, T), None unless rows are packed, keeps each query within its own document (no cache then)."""

    positions: torch.Tensor
    valid: torch.Tensor | None
    rope: tuple[torch.Tensor, torch.Tensor] | None
    alibi: torch.Tensor | None
    cache: KVCache | None
    causal: bool
    plain_causal: bool
    segments: torch.Tensor | None = None
    _masks: tuple | None = field(default=None, repr=False)  # (k_pos, k_valid, window, built)

    def masks(
        self, k_pos: torch.Tensor, k_valid: torch.Tensor | None, window: int | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`masks.visibility` for this call's queries. The KVCache protocol gives every layer of a call
        the same key positions, so the first layer's build serves the rest; the entry keeps its inputs
        alive so a reused address cannot alias a different tensor."""
        if self._masks is not None:
            pos, valid, win, built = self._masks
            if _same(pos, k_pos) and _same(valid, k_valid) and win == window:
                return built
        built = visibility(
            self.positions, k_pos, k_valid, causal=self.causal, window=window, segments=self.segments
        )
        self._masks = (k_pos, k_valid, window, built)
        return built


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


@dataclass(frozen=True)
class FusedQKV:
    """The q, k, v projections' parameters as row blocks of one tensor (`infer.layout.fuse_qkv`), so a
    decode step multiplies once instead of three times. The modules stay separate `nn.Linear`s whose
    parameters are views of `weight`/`bias`; the fused product is used only while those very modules
    are in place and their parameters are still those views, so swapping a projection, `model.to(...)`
    or loading new tensors silently returns to the three separate calls."""

    modules: tuple[nn.Module, nn.Module, nn.Module]
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def serves(self, q: nn.Module, k: nn.Module, v: nn.Module) -> bool:
        if q is not self.modules[0] or k is not self.modules[1] or v is not self.modules[2]:
            return False
        rows = 0
        for m in self.modules:
            for param, whole in ((m.weight, self.weight), (m.bias, self.bias)):
                if (param is None) != (whole is None):
                    return False
                if param is not None and param.data_ptr() != whole[rows].data_ptr():
                    return False
            rows += m.weight.shape[0]
        return True


class Attention(nn.Module):
    """Query, key, value and output projections (`q`, `k`, `v`, `o`), RoPE or ALiBi, attention.

    Each projection is its own `nn.Linear`, called as a module, so replacing one (a LoRA or quantized
    wrapper: `attn.q = Wrapper(attn.q)`) changes the forward with nothing else to touch.
    """

    def __init__(self, config: ModelConfig, layer: int, attn_impl: str = "sdpa"):
        super().__init__()
        self.config, self.layer = config, layer
        self.attn_impl = check_attn_impl(attn_impl)
        self.q = nn.Linear(config.d_model, config.q_dim, bias=config.qkv_bias)
        self.k = nn.Linear(config.d_model, config.kv_dim, bias=config.qkv_bias)
        self.v = nn.Linear(config.d_model, config.kv_dim, bias=config.qkv_bias)
        self.o = nn.Linear(config.q_dim, config.d_model, bias=config.out_bias)
        self.last_weights: torch.Tensor | None = None  # filled when `store_weights` is set (eager only)
        self.store_weights = False
        # set by `infer.layout.fuse_qkv` (or, for quantized projections, `compress`): any object with
        # `serves(q, k, v)` and a call x -> [q | k | v]
        self.fused_qkv: FusedQKV | None = None

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        q, k, v = self._project(x, ctx.rope)
        # (B, T, heads, D) -> (B, heads, T, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k_pos, k_valid, plain_causal = ctx.positions, ctx.valid, ctx.plain_causal
        if ctx.cache is not None:
            k, v, k_pos, k_valid = ctx.cache.update(self.layer, k, v)
            plain_causal = False
        impl = "eager" if self.store_weights else self.attn_impl
        # flash builds its masks per tile; sdpa's causal kernel needs none
        mask_free = impl == "flash" or (
            impl == "sdpa" and plain_causal and ctx.causal and c.sliding_window is None and ctx.alibi is None
        )
        masks = None if mask_free else ctx.masks(k_pos, k_valid, c.sliding_window)
        y, weights = attend(
            q, k, v, ctx.positions, k_pos, k_valid, impl=impl, causal=ctx.causal, window=c.sliding_window,
            alibi_slopes=ctx.alibi, plain_causal=plain_causal, return_weights=self.store_weights,
            masks=masks, segments=ctx.segments,
        )  # fmt: skip
        self.last_weights = weights
        return self.o(y.transpose(1, 2).reshape(B, T, c.q_dim))

    def _project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, T, H, D), k and v (B, T, KV, D), RoPE applied to q and k. With a fused product, q and
        k are adjacent columns of one output, so one rotation serves both heads' sets (a decode step
        of a deep, thin model is dominated by the count of such small ops, not their size)."""
        c = self.config
        B, T, _ = x.shape
        H, KV, D = c.n_heads, c.n_kv_heads, c.head_dim
        fused = self.fused_qkv
        if fused is None or not fused.serves(self.q, self.k, self.v):
            q, k = self.q(x).view(B, T, H, D), self.k(x).view(B, T, KV, D)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            return q, k, self.v(x).view(B, T, KV, D)
        qkv = fused(x)  # (B, T, (H + 2·KV)·D)
        v = qkv[..., c.q_dim + c.kv_dim :].view(B, T, KV, D)
        qk = qkv[..., : c.q_dim + c.kv_dim].view(B, T, H + KV, D)
        if rope is not None:
            qk = apply_rope(qk, *rope)
        return qk[:, :, :H], qk[:, :, H:], v
