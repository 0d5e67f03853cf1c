"""Inference: KV caches, sampling, generate (greedy, sampling, beam, contrastive, speculative), the batching engine."""

from lmstack.infer.beam import Beam
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
from lmstack.infer.contrastive import Contrastive
from lmstack.infer.engine import Engine
from lmstack.infer.generate import generate, generate_text
from lmstack.infer.layout import optimize_for_decode
from lmstack.infer.request import Generation, TokenEvent
from lmstack.infer.sampling import SamplingParams
from lmstack.infer.speculative import Speculative

__all__ = [
    "CACHE_KINDS",
    "Beam",
    "BlockAllocator",
    "CacheFull",
    "Contrastive",
    "DynamicCache",
    "Engine",
    "Generation",
    "PagedCache",
    "RollingCache",
    "SamplingParams",
    "Speculative",
    "StaticCache",
    "TokenEvent",
    "generate",
    "generate_text",
    "make_cache",
    "optimize_for_decode",
]
