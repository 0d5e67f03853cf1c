"""Every cache gives the logits of recomputing the full sequence without a cache."""

from __future__ import annotations

import pytest
import torch

from lmstack.infer.cache import CACHE_KINDS, PagedCache, RollingCache, StaticCache, make_cache

CHUNKS = (13, 1, 1, 3, 1, 5, 1, 1, 2, 1)  # a prefill, single decode steps, multi-token (speculative) calls


def _feed(model, cache, ids, mask=None):
    """Feed `ids` (B, T) chunk by chunk through `cache`; return the logits of every position."""
    positions = (
        (mask.cumsum(-1) - 1).clamp(min=0) if mask is not None else torch.arange(ids.shape[1]).expand_as(ids)
    )
    out, start = [], 0
    for n in CHUNKS:
        sl = slice(start, start + n)
        chunk_mask = mask[:, sl] if mask is not None else None
        out.append(model(ids[:, sl], positions=positions[:, sl], cache=cache, attention_mask=chunk_mask))
        start += n
    return torch.cat(out, 1)


@pytest.mark.parametrize("kind", CACHE_KINDS)
@pytest.mark.parametrize("window", [None, 6])
def test_cache_matches_recompute(make_tiny, kind, window):
    if kind == "rolling" and window is None:
        pytest.skip("rolling caches serve sliding-window models")
    model = make_tiny(sliding_window=window)
    T = sum(CHUNKS)
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :4] = 0  # row 1 is left-padded by 4
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        cache = make_cache(kind, model.config, 2, T, dtype=torch.float64, extra=4)
        got = _feed(model, cache, ids, mask)
    assert torch.allclose(got[0], ref[0], atol=1e-10)
    assert torch.allclose(got[1, 4:], ref[1, 4:], atol=1e-10)  # padding positions predict nothing
    assert ref.abs().max() > 1.0  # sharp logits, not a near-uniform model


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_truncate_then_continue_matches_recompute(make_tiny, kind):
    """Speculative rollback: write 4 tokens, keep 1, continue differently; the result is as if never written."""
    model = make_tiny(sliding_window=5)
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 61, (1, 12), generator=g)
    rejected = torch.randint(0, 61, (1, 4), generator=g)
    cont = torch.randint(0, 61, (1, 6), generator=g)
    with torch.no_grad():
        cache = make_cache(kind, model.config, 1, 32, dtype=torch.float64, extra=4)
        model(prefix, cache=cache)
        model(rejected, positions=torch.arange(12, 16)[None], cache=cache)
        cache.truncate(13)  # keep the first rejected token
        seq = torch.cat((prefix, rejected[:, :1], cont), 1)
        got = model(cont, positions=torch.arange(13, 19)[None], cache=cache)
        ref = model(seq)[:, 13:]
    assert torch.allclose(got, ref, atol=1e-10)


def test_hybrid_cache_doubles_and_static_refuses(make_tiny):
    model = make_tiny()
    cache = StaticCache(model.config, 1, 4, dtype=torch.float64, growable=True)
    ids = torch.randint(0, 61, (1, 11))
    with torch.no_grad():
        for t in range(11):
            model(ids[:, t : t + 1], cache=cache)
        assert cache.capacity == 16  # 4 -> 8 -> 16
        ref = model(ids)[:, -1]
        cache.truncate(10)
        assert torch.allclose(model(ids[:, 10:], cache=cache)[:, -1], ref, atol=1e-10)
        static = StaticCache(model.config, 1, 4, dtype=torch.float64)
        model(ids[:, :4], cache=static)
        with pytest.raises(Exception, match="static KV cache holds 4 tokens"):
            model(ids[:, 4:5], cache=static)
        assert static.seen_tokens == 4  # refused in `begin`, before anything was written


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_each_forward_plans_once_then_updates_every_layer(make_tiny, kind):
    model = make_tiny(sliding_window=6)
    cache = make_cache(kind, model.config, 1, 32, dtype=torch.float64)
    calls, begin, update = [], cache.begin, cache.update
    cache.begin = lambda positions, valid: (calls.append("begin"), begin(positions, valid))[1]
    cache.update = lambda layer, k, v: (calls.append(layer), update(layer, k, v))[1]
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = torch.cat(
            [model(ids[:, :7], cache=cache), model(ids[:, 7:8], cache=cache), model(ids[:, 8:], cache=cache)],
            1,
        )
        ref = model(ids)
    assert calls == ["begin", 0, 1] * 3 and cache.seen_tokens == 9
    assert torch.allclose(got, ref, atol=1e-10)


def test_rolling_cache_is_window_plus_speculation_depth(make_tiny):
    model = make_tiny(sliding_window=6)
    cache = RollingCache(model.config, 1, dtype=torch.float64, extra=3)
    assert cache.size == 9 and cache.k[0].shape[2] == 9
    with torch.no_grad():
        model(torch.randint(0, 61, (1, 30)), cache=cache)
    with pytest.raises(ValueError, match="cannot roll back 5 tokens"):
        cache.truncate(25)


def test_paged_cache_allocates_blocks_and_frees_them(make_tiny):
    model = make_tiny()
    cache = PagedCache(model.config, n_blocks=8, block_size=4, dtype=torch.float64)
    cache.add(7)
    cache.add(9)
    with torch.no_grad():
        model(torch.randint(0, 61, (1, 9)), cache=cache.bind([7]))  # 9 tokens -> 3 blocks
        model(torch.randint(0, 61, (1, 4)), cache=cache.bind([9]))  # 4 tokens -> 1 block
    assert cache.blocks_in_use == 4 and len(cache.tables[7]) == 3
    cache.truncate(5, seq_id=7)  # 5 tokens -> 2 blocks
    assert cache.blocks_in_use == 3
    cache.free(7)
    cache.free(9)
    assert cache.blocks_in_use == 0 and cache.allocator.free == 8
    cache.add(1)
    assert not cache.reserve(1, 33)  # 9 blocks > 8: refused, nothing taken
    assert cache.blocks_in_use == 0


def test_paged_batch_rows_of_different_lengths_match_solo(make_tiny):
    model = make_tiny()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 61, (1, 7), generator=g), torch.randint(0, 61, (1, 3), generator=g)
    nxt = torch.randint(0, 61, (2, 1), generator=g)
    cache = PagedCache(model.config, n_blocks=16, block_size=2, dtype=torch.float64)
    for sid in (0, 1):
        cache.add(sid)
    with torch.no_grad():
        model(a, cache=cache.bind([0]))
        model(b, cache=cache.bind([1]))
        got = model(nxt, positions=torch.tensor([[7], [3]]), cache=cache.bind([0, 1]))[:, -1]
        ref_a = model(torch.cat((a, nxt[:1]), 1))[:, -1]
        ref_b = model(torch.cat((b, nxt[1:]), 1))[:, -1]
    assert torch.allclose(got[0], ref_a[0], atol=1e-10) and torch.allclose(got[1], ref_b[0], atol=1e-10)
