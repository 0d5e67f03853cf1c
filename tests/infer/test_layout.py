"""`optimize_for_decode` and `fuse_qkv` keep the model's function: same logits, swaps still honoured."""

from __future__ import annotations

import torch
from torch import nn

from lmstack.infer.cache import StaticCache
from lmstack.infer.layout import fuse_qkv, optimize_for_decode
from lmstack.interop.hf import hf_state_dict


class Doubled(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.inner(x)


def _calls(model) -> list[int]:
    """Counts of separate q-projection calls, per layer, recorded from now on."""
    counts = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.attn.q.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def test_fused_qkv_gives_the_same_logits_with_one_matmul(make_tiny):
    model = make_tiny(qkv_bias=True)
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        assert fuse_qkv(model) == 2
        calls = _calls(model)
        got = model(ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert calls == [0, 0]  # the fused product served both layers
    names = set(hf_state_dict(model))  # views of one tensor still save as separate tensors
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.bias"} <= names


def test_swapping_a_projection_after_fusing_takes_effect(make_tiny):
    model = make_tiny()
    reference = make_tiny()
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(1))
    fuse_qkv(model)
    calls = _calls(model)
    with torch.no_grad():
        model.blocks[1].attn.k = Doubled(model.blocks[1].attn.k)
        reference.blocks[1].attn.k.weight.mul_(2)
        got, want = model(ids), reference(ids)
        model.to(torch.float32)  # re-stored parameters are no longer views: layer 0 falls back too
        model(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert calls == [1, 2]  # layer 1 ran q, k, v separately in both calls; layer 0 only after `.to`


def test_optimize_for_decode_keeps_cached_decoding_exact(make_tiny):
    model = make_tiny(n_heads=4, n_kv_heads=4, d_model=64)
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids)
        optimize_for_decode(model, repeats=1)
        cache = StaticCache(model.config, 1, 12, dtype=torch.float64)
        got = torch.cat(
            [model(ids[:, :8], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(8, 12)],
            1,
        )
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    assert all(block.attn.fused_qkv is not None for block in model.blocks)
