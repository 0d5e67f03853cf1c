"""KV-cache bytes: against tensors shaped as seed 003 §12 says, and against a real model's cached K/V.

The inference engine's caches arrive later; until then a minimal cache that follows the model's
`KVCache` protocol stores exactly the K and V tensors the model hands it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmstack.arith import bytes_per_element, kv_cache
from lmstack.arith.kv_cache import cached_tokens
from lmstack.config import ModelConfig
from lmstack.presets import PRESETS

TORCH_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": torch.float8_e4m3fn,
}


def seed_shaped_cache(config: ModelConfig, batch: int, tokens: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Seed 003 §12: K and V per layer, each (batch, n_kv_heads, seq_len, d_k)."""
    shape = (batch, config.n_kv_heads, tokens, config.head_dim)
    return [torch.empty(shape, dtype=dtype, device="meta") for _ in range(2 * config.n_layers)]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("name", list(PRESETS))
def test_bytes_equal_seed_shaped_tensors(name, dtype):
    config = ModelConfig.preset(name)
    batch, context = 3, 1000
    kv = kv_cache(config, context, batch, dtype)
    tensors = seed_shaped_cache(config, batch, cached_tokens(config, context), TORCH_DTYPES[dtype])
    assert kv.bytes_per_batch == nbytes(tensors)
    assert kv.bytes_per_token * kv.tokens_per_sequence * batch == nbytes(tensors)


def test_llama2_7b_bytes_per_token():
    assert kv_cache(ModelConfig.preset("llama2-7b"), 1).bytes_per_token == 524_288


def test_gqa_and_mqa_shrink_by_the_group_ratio():
    gqa = ModelConfig.preset("llama2-70b")
    mha = dataclasses.replace(gqa, n_kv_heads=64)
    mqa = dataclasses.replace(gqa, n_kv_heads=1)
    per = lambda c: kv_cache(c, 1).bytes_per_token  # noqa: E731
    assert per(mha) == 8 * per(gqa) == 64 * per(mqa)


def test_sliding_window_caps_per_sequence():
    mistral = ModelConfig.preset("mistral-7b")  # window 4096
    assert kv_cache(mistral, 2000).tokens_per_sequence == 2000
    assert kv_cache(mistral, 32768).tokens_per_sequence == 4096
    assert (
        kv_cache(mistral, 32768, batch=4).bytes_per_batch == 4 * 4096 * kv_cache(mistral, 1).bytes_per_token
    )


def test_cache_length_is_the_mask_rule():
    from lmstack.model.masks import sees, visible_keys

    for window in (None, 1, 5, 64):
        config = ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, d_ff=8, sliding_window=window)
        for s in (1, 5, 6, 40):
            last = torch.tensor(s - 1)
            assert cached_tokens(config, s) == int(sees(last, torch.arange(s), window=window).sum())
            assert cached_tokens(config, s) == visible_keys(s, window)


# ---- a real model's K/V, in the inference engine's caches ----------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_bytes_per_token_equal_a_prefilled_cache(n_kv_heads, dtype):
    from lmstack.model import build_model

    config = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, d_ff=48)
    model = build_model(config, seed=0, dtype=TORCH_DTYPES[dtype])
    from lmstack.infer.cache import DynamicCache

    batch, s = 2, 11
    cache = DynamicCache(config.n_layers)
    with torch.no_grad():
        model(torch.randint(0, 64, (batch, s)), cache=cache)
    assert cache.memory_bytes() / (batch * s) == kv_cache(config, s, batch, dtype).bytes_per_token
    assert cache.memory_bytes() == kv_cache(config, s, batch, dtype).bytes_per_batch


def test_window_sized_rolling_cache_decodes_exactly():
    """Keeping only `window` tokens per sequence loses nothing: cached decode equals recomputation."""
    from lmstack.infer.cache import RollingCache
    from lmstack.model import build_model

    window, prompt, steps = 4, 9, 5
    config = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, sliding_window=window
    )
    model = build_model(config, seed=0, attn_impl="eager")
    ids = torch.randint(0, 64, (1, prompt + steps), generator=torch.Generator().manual_seed(1))
    cache = RollingCache(config, 1, dtype=torch.float32)  # a ring of exactly `window` slots
    sequence_bytes = kv_cache(config, 10**6, 1, "fp32").bytes_per_sequence
    with torch.no_grad():
        full = model(ids)
        model(ids[:, :prompt], cache=cache)
        assert cache.memory_bytes() == sequence_bytes == cached_tokens(config, 10**6) * 2 * 2 * 2 * 8 * 4
        for t in range(prompt, prompt + steps):
            step = model(ids[:, t : t + 1], cache=cache)
            torch.testing.assert_close(step[:, -1], full[:, t], rtol=1e-5, atol=1e-5)
            assert cache.memory_bytes() == sequence_bytes


def test_dtype_sizes():
    assert bytes_per_element("fp8") == bytes_per_element("int8") == 1
    assert bytes_per_element("int4") == 0.5
