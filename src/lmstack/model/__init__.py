"""The decoder model: attention, positions, norms, MLP, MoE and the block that composes them."""

from lmstack.model.attention import ATTN_IMPLS, KVCache, attend
from lmstack.model.transformer import Block, Transformer, build_model

__all__ = ["ATTN_IMPLS", "Block", "KVCache", "Transformer", "attend", "build_model"]
