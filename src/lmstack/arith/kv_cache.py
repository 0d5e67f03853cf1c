"""KV-cache sizes: bytes per token, per sequence and per batch, for MHA, GQA, MQA and sliding windows.

Each layer caches one key and one value vector per KV head per token (Pope et al. 2022):

    bytes per token = 2 (K and V) × n_layers × n_kv_heads × head_dim × bytes per element

GQA and MQA shrink it through `n_kv_heads` (Llama-2-70B: 8 KV heads for 64 query heads, 8× smaller
than MHA). With a sliding window a query at position i only sees keys i - window < j <= i, so a cache
never needs more than `window` tokens per sequence (the rolling cache of Mistral); without one it
holds every token of the context. This is the visibility rule of `lmstack.model.masks.sees`
(`visible_keys` there gives the same length; tests/arith/test_kv_cache.py checks they agree) —
restated here so the arithmetic needs no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmstack.arith.memory import bytes_per_element
from lmstack.config import ModelConfig


@dataclass(frozen=True)
class KVCacheSize:
    dtype: str
    context: int
    batch: int
    bytes_per_token: float
    tokens_per_sequence: int  # cached tokens per sequence: min(context, window)

    @property
    def bytes_per_sequence(self) -> float:
        return _exact(self.bytes_per_token * self.tokens_per_sequence)

    @property
    def bytes_per_batch(self) -> float:
        return _exact(self.bytes_per_sequence * self.batch)

    def to_dict(self) -> dict[str, object]:
        return {
            "dtype": self.dtype,
            "context": self.context,
            "batch": self.batch,
            "bytes_per_token": self.bytes_per_token,
            "tokens_per_sequence": self.tokens_per_sequence,
            "bytes_per_sequence": self.bytes_per_sequence,
            "bytes_per_batch": self.bytes_per_batch,
        }


def kv_elements_per_token(config: ModelConfig) -> int:
    """2 × n_layers × n_kv_heads × head_dim cached numbers per token."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim


def bytes_per_token(config: ModelConfig, dtype: str = "bf16") -> float:
    return _exact(kv_elements_per_token(config) * bytes_per_element(dtype))


def _exact(n: float) -> float:
    """Whole byte counts as ints, so they print and serialise without a fractional part."""
    return int(n) if float(n).is_integer() else n


def cached_tokens(config: ModelConfig, context: int) -> int:
    """Tokens a sequence of `context` tokens keeps in its cache: all of them, or the sliding window."""
    return min(context, config.sliding_window) if config.sliding_window else context


def kv_cache(config: ModelConfig, context: int, batch: int = 1, dtype: str = "bf16") -> KVCacheSize:
    return KVCacheSize(
        dtype=dtype,
        context=context,
        batch=batch,
        bytes_per_token=bytes_per_token(config, dtype),
        tokens_per_sequence=cached_tokens(config, context),
    )
