"""The decoder: embeddings, N blocks, final norm, LM head. One block serves every family by config.

Pre-norm (GPT-2 onwards): x = x + attn(norm(x)); x = x + mlp(norm(x)) — the residual stream is never
normalised, which keeps gradients well-behaved in deep stacks. Post-norm (the original transformer):
x = norm(x + attn(x)); x = norm(x + mlp(x)).
"""

from __future__ import annotations

import math

import torch
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


def _embedding(n: int, d: int) -> nn.Embedding:
    """`nn.Embedding(n, d)`, uninitialised when built on the meta device: its own `normal_` init has no
    meta kernel but a Python decomposition whose import pulls in `torch._dynamo` (~2 s and ~75 MB
    resident for every command that loads a checkpoint), and meta tensors hold no values anyway."""
    if torch.empty(0).is_meta:  # the device of the enclosing `torch.device(...)` context
        return nn.Embedding(n, d, _weight=torch.empty(n, d))
    return nn.Embedding(n, d)


class Transformer(nn.Module):
    """Decoder-only language model: `model(input_ids, ...)` -> logits (B, T, vocab).

    Every projection is an `nn.Linear` called as a module, under names adapters and quantizers target:
    `blocks.{i}.attn.{q,k,v,o}`, `blocks.{i}.mlp.{gate,up,down}` (each expert `mlp.experts.{e}.*` the
    same, beside `mlp.router`) and `lm_head`. Tied embeddings share one parameter
    (`lm_head.weight is tok_emb.weight`); the state dict then holds it once, as `tok_emb.weight`.
    """

    def __init__(self, config: ModelConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        self.tok_emb = _embedding(config.vocab_size, config.d_model)
        self.pos_emb = (
            _embedding(config.max_seq_len, config.d_model) if config.position == "learned" else None
        )
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(Block(config, i, attn_impl) for i in range(config.n_layers))
        self.norm = Norm(config)
        tied = config.tie_embeddings  # a tied head's own weight is never allocated: it is replaced at once
        self.lm_head = nn.Linear(
            config.d_model, config.vocab_size, bias=False, device="meta" if tied else None
        )
        if tied:
            self._tie()
        # A tied head's key is dropped from the state dict and restored on load, so checkpoints, the
        # HF weight maps and safetensors (which refuses aliased tensors) see the weight once.
        self.register_state_dict_post_hook(_drop_tied_head)
        self.register_load_state_dict_post_hook(_retie_head)
        # RoPE frequencies and ALiBi slopes are recomputed per call (a few hundred floats) rather than
        # kept as buffers, so `model.to(bfloat16)` cannot round them.
        self.gradient_checkpointing = False
        self.aux_loss: torch.Tensor | None = None

    def _tie(self) -> None:
        self.lm_head.weight = self.tok_emb.weight

    def _apply(self, fn, recurse: bool = True):
        # `.to()` keeps a shared parameter shared by swapping its data in place, but `to_empty()` (a
        # meta-built model made real) makes a new parameter per module: tie again afterwards
        tied = getattr(self.lm_head, "weight", None) is self.tok_emb.weight
        super()._apply(fn, recurse)
        if tied:
            self._tie()
        return self

    # ---- configuration at run time ----------------------------------------------------------
    @property
    def attn_impl(self) -> str:
        return self.blocks[0].attn.attn_impl if len(self.blocks) else "sdpa"

    def set_attn_impl(self, impl: str) -> None:
        """Switch between `eager`, `sdpa` and `flash` without touching the weights."""
        check_attn_impl(impl)
        for block in self.blocks:
            block.attn.attn_impl = impl

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the embedding's, which stays floating when linears are packed to integers."""
        return self.tok_emb.weight.dtype

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied head's weight is yielded once
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
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T).

        `positions` (B, T) default to 0..T-1 after what `cache` has seen, or, for a left-padded batch
        given `attention_mask` (B, T: 1 for real tokens of this call), count from each first real
        token. `cache` follows the `KVCache` protocol: the model calls `cache.begin` once, then
        `cache.update` once per layer. After the call, `self.aux_loss` holds the MoE load-balancing
        loss (None for dense models). `segments` (B, T) packs several documents in a row: a token
        attends only to tokens of its own segment (give each document's positions from 0, and mark
        padding in `attention_mask`); not with a cache.
        """
        return self.head(
            self.features(
                input_ids, positions=positions, cache=cache, attention_mask=attention_mask, segments=segments
            )
        )

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head over final hidden states (B, T, d) -> logits (B, T, vocab)."""
        return self.lm_head(hidden)

    def features(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, d): the forward pass without the LM head."""
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        valid = None if attention_mask is None else attention_mask.to(torch.bool)
        if valid is not None and valid.shape != input_ids.shape:
            raise InputError(
                f"attention_mask shape {tuple(valid.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        if segments is not None and (segments.shape != input_ids.shape or cache is not None):
            raise InputError(
                f"segments {tuple(segments.shape)} must match input_ids {tuple(input_ids.shape)}, without a "
                "cache — packed rows are a training-time input"
            )
        plain_causal = positions is None and attention_mask is None and cache is None and segments is None
        if positions is None:
            positions = self._positions(input_ids, cache, attention_mask)
        x = self._embed(input_ids, positions)
        c = self.config
        rope = rope_cos_sin(c, positions, dtype=x.dtype) if c.position == "rope" else None
        alibi = alibi_slopes(c.n_heads).to(x.device) if c.position == "alibi" else None
        if cache is not None:
            cache.begin(positions, valid)
        ctx = ForwardContext(
            positions, valid, rope, alibi, cache, causal=True, plain_causal=plain_causal, segments=segments
        )
        x, router_logits = self._run_blocks(x, ctx)
        self.aux_loss = self._moe_loss(router_logits, valid)
        return self.norm(x)

    def _positions(
        self, input_ids: torch.Tensor, cache: KVCache | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Default positions (B, T): after what the cache holds, or from each row's first real token."""
        B, T = input_ids.shape
        offset = cache.seen_tokens if cache is not None else 0
        if attention_mask is not None:
            if offset:
                # each padded row's position depends on its own padding, which only the caller knows
                raise InputError("with a non-empty cache and an attention_mask, pass positions explicitly")
            return positions_from_padding(attention_mask)
        return torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, d), scaled, plus learned or sinusoidal position embeddings."""
        c = self.config
        x = self.tok_emb(input_ids)
        if c.embedding_scale != 1.0:
            x = x * torch.tensor(c.embedding_scale, dtype=x.dtype)
        if self.pos_emb is not None:
            if positions.numel() and int(positions.max()) >= c.max_seq_len:
                raise InputError(
                    f"position {int(positions.max())} is past max_seq_len={c.max_seq_len} of learned position "
                    "embeddings — shorten the input"
                )
            x = x + self.pos_emb(positions)
        elif c.position == "sinusoidal":
            x = x + sinusoidal_embedding(positions, c.d_model, x.dtype)
        return self.drop(x)

    def _run_blocks(self, x: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
        router_logits = []
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and ctx.cache is None:
                x, logits = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x, logits = block(x, ctx)
            if logits is not None:
                router_logits.append(logits)
        return x, router_logits

    def _moe_loss(self, router_logits: list[torch.Tensor], valid: torch.Tensor | None) -> torch.Tensor | None:
        if not router_logits:
            return None
        c = self.config
        return load_balancing_loss(router_logits, c.n_experts, c.n_experts_per_token, valid)

    # ---- initialisation -----------------------------------------------------------------------
    def reset_parameters(self, std: float = 0.02) -> None:
        """GPT-2 initialisation: N(0, std) weights, zero biases, unit norms, and the residual output
        projections scaled by 1/√(2·n_layers) so the residual stream's variance does not grow with depth."""
        done: set[int] = set()  # a tied head's weight is the embedding's, initialised once
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if id(module.weight) in done:
                    continue
                done.add(id(module.weight))
                scale = 1 / math.sqrt(2 * self.config.n_layers) if name.endswith(("attn.o", ".down")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Norm):
                module.reset_parameters()


def _drop_tied_head(module: Transformer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if getattr(module.lm_head, "weight", None) is module.tok_emb.weight:
        state_dict.pop(prefix + "lm_head.weight", None)


def _retie_head(module: Transformer, incompatible_keys) -> None:
    # loading with assign=True (onto a meta-built model) replaces the embedding's parameter: tie again
    if module.config.tie_embeddings and isinstance(module.lm_head, nn.Linear):
        module._tie()
        missing = incompatible_keys.missing_keys
        for key in [k for k in missing if k == "lm_head.weight" or k.endswith(".lm_head.weight")]:
            missing.remove(key)


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
