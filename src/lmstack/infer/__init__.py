"""Inference: KV caches, sampling, generate (greedy, sampling, beam, contrastive, speculative), the batching engine."""

from lmstack.infer.cache import (
    CACHE_KINDS,
    BlockAllocator,
    CacheFull,
    DynamicCache,
    PagedCache,
    RollingCache,
    StaticCache,
    make_cache,
)
from lmstack.infer.engine import Engine, TokenEvent
from lmstack.infer.generate import Generation, generate, generate_text, render_chat
from lmstack.infer.layout import optimize_for_decode
from lmstack.infer.sampling import SamplingParams

__all__ = [
    "CACHE_KINDS",
    "BlockAllocator",
    "CacheFull",
    "DynamicCache",
    "Engine",
    "Generation",
    "PagedCache",
    "RollingCache",
    "SamplingParams",
    "StaticCache",
    "TokenEvent",
    "generate",
    "generate_text",
    "make_cache",
    "optimize_for_decode",
    "render_chat",
]
