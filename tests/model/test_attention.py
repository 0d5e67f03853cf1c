"""eager, sdpa and flash attention agree — forward and backward — on every masking situation."""

from __future__ import annotations

import math

import pytest
import torch

from lmstack.model.attention import attend
from lmstack.model.flash import flash_attention
from lmstack.model.masks import attention_mask, sees, visibility
from lmstack.model.position import alibi_slopes


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def reference_attention(q, k, v, q_pos, k_pos, k_valid, window=None, slopes=None):
    """The formula, one head and one query at a time, with K/V physically repeated for GQA."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // group], v[b, h // group]
            for t in range(T):
                keep = [
                    s
                    for s in range(k.shape[2])
                    if (k_valid is None or k_valid[b, s])
                    and k_pos[b, s] <= q_pos[b, t]
                    and (window is None or q_pos[b, t] - k_pos[b, s] < window)
                ]
                if not keep:
                    continue
                scores = kh[keep] @ q[b, h, t] / math.sqrt(D)
                if slopes is not None:
                    scores = scores - slopes[h] * (q_pos[b, t] - k_pos[b, keep]).double()
                out[b, h, t] = torch.softmax(scores, 0) @ vh[keep]
    return out


def make_case(B=2, H=4, KV=2, T=9, S=9, D=8, offset=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, requires_grad=True)
    k = torch.randn(B, KV, S, D, generator=g, requires_grad=True)
    v = torch.randn(B, KV, S, D, generator=g, requires_grad=True)
    k_pos = torch.arange(S).expand(B, S)
    q_pos = torch.arange(offset, offset + T).expand(B, T) if offset else torch.arange(S - T, S).expand(B, T)
    return q, k, v, q_pos, k_pos


CASES = {
    "mha": dict(H=4, KV=4),
    "gqa": dict(H=4, KV=2),
    "mqa": dict(H=4, KV=1),
    "offset_queries": dict(H=4, KV=2, T=3, S=11),  # cached decoding / speculative verification
    "single_query": dict(H=4, KV=1, T=1, S=7),
}


def run_all(q, k, v, q_pos, k_pos, k_valid, **kw):
    results = {}
    for impl in ("eager", "sdpa", "flash"):
        for t in (q, k, v):
            t.grad = None
        out, _ = attend(q, k, v, q_pos, k_pos, k_valid, impl=impl, **kw)
        out.backward(torch.ones_like(out) + torch.arange(out.numel()).view_as(out) % 3)
        results[impl] = (out.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone())
    return results


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_impls_agree_with_reference(case, window):
    q, k, v, q_pos, k_pos = make_case(**CASES[case])
    expected = reference_attention(q.detach(), k.detach(), v.detach(), q_pos, k_pos, None, window)
    results = run_all(q, k, v, q_pos, k_pos, None, window=window)
    for impl, (out, dq, dk, dv) in results.items():
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9, msg=f"{impl} forward")
        torch.testing.assert_close(dq, results["eager"][1], rtol=1e-8, atol=1e-8, msg=f"{impl} dq")
        torch.testing.assert_close(dk, results["eager"][2], rtol=1e-8, atol=1e-8, msg=f"{impl} dk")
        torch.testing.assert_close(dv, results["eager"][3], rtol=1e-8, atol=1e-8, msg=f"{impl} dv")


def test_gradients_match_autograd_of_reference():
    q, k, v, q_pos, k_pos = make_case(H=4, KV=2, T=6, S=6)
    out = flash_attention(q, k, v, q_pos, k_pos, None, window=4, scale=q.shape[-1] ** -0.5, block_size=2)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = reference_attention(q, k, v, q_pos, k_pos, None, 4)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_padding_and_small_tiles_and_alibi():
    """Left padding (invalid keys, positions from each first real token), tiles smaller than the
    sequence, ALiBi bias: all three agree with the per-query reference on the real tokens."""
    B, H, KV, T, D = 2, 4, 2, 13, 8
    q, k, v, _, _ = make_case(B=B, H=H, KV=KV, T=T, S=T, D=D, seed=1)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :5] = False
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    slopes = alibi_slopes(H).double()
    expected = reference_attention(q.detach(), k.detach(), v.detach(), pos, pos, valid, None, slopes)
    for impl in ("eager", "sdpa", "flash"):
        out, _ = attend(q, k, v, pos, pos, valid, impl=impl, alibi_slopes=slopes)
        torch.testing.assert_close(
            out[valid[:, None, :].expand(B, H, T)], expected[valid[:, None, :].expand(B, H, T)]
        )
        assert torch.isfinite(out).all(), f"{impl}: a padding query must not produce NaN"
    tiled = flash_attention(q, k, v, pos, pos, valid, alibi_slopes=slopes, scale=D**-0.5, block_size=4)
    torch.testing.assert_close(tiled, attend(q, k, v, pos, pos, valid, impl="flash", alibi_slopes=slopes)[0])


def test_eager_returns_weights_that_sum_to_one():
    q, k, v, q_pos, k_pos = make_case()
    _, weights = attend(q, k, v, q_pos, k_pos, None, impl="eager", return_weights=True)
    assert weights.shape == (2, 4, 9, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9))
    assert (weights.triu(1) == 0).all(), "causal: no weight on future keys"


def test_sliding_window_rule_matches_mistral_convention():
    # transformers' Mistral: key j visible to query i iff i - window < j <= i
    q_pos, k_pos = torch.arange(8)[:, None], torch.arange(8)[None, :]
    allowed = sees(q_pos, k_pos, window=3)
    for i in range(8):
        assert allowed[i].nonzero().flatten().tolist() == list(range(max(0, i - 2), i + 1))
    mask = attention_mask(torch.arange(4)[None], torch.arange(4)[None], torch.tensor([[0, 1, 1, 1]]).bool())
    assert mask.shape == (1, 1, 4, 4) and not mask[0, 0, :, 0].any()


def saved_bytes_for_backward(impl: str, s: int, d: int = 16) -> int:
    """Bytes of tensors autograd keeps for backward through one attention call of length s."""
    q = torch.randn(1, 2, s, d, dtype=torch.float32, requires_grad=True)
    k = torch.randn(1, 2, s, d, dtype=torch.float32, requires_grad=True)
    v = torch.randn(1, 2, s, d, dtype=torch.float32, requires_grad=True)
    pos = torch.arange(s)[None]
    inputs = {q.data_ptr(), k.data_ptr(), v.data_ptr()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in inputs:
            total += t.numel() * t.element_size()
            inputs.add(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attend(q, k, v, pos, pos, None, impl=impl)[0].sum()
    return total


def test_flash_saves_linear_memory_eager_quadratic():
    small, large = 256, 1024
    flash_growth = saved_bytes_for_backward("flash", large) / saved_bytes_for_backward("flash", small)
    eager_growth = saved_bytes_for_backward("eager", large) / saved_bytes_for_backward("eager", small)
    assert flash_growth <= 4.5, f"flash saved memory grew {flash_growth:.1f}x for 4x the sequence: not O(s·d)"
    assert eager_growth >= 12, f"eager should keep the (s × s) weights: grew only {eager_growth:.1f}x"
    s_by_s = large * large * 2 * 4  # one fp32 score matrix per head
    assert saved_bytes_for_backward("flash", large) < s_by_s / 4


def test_visibility_drops_masks_that_hide_nothing():
    # a decode query at the newest position sees every cached key: no mask, no zeroing
    mask, seen = visibility(torch.tensor([[5]]), torch.arange(6)[None], None)
    assert mask is None and seen is None
    # an invalid key hides something, but every query still sees a key: a mask, no zeroing
    pos, valid = torch.arange(3)[None], torch.tensor([[True, False, True]])
    mask, seen = visibility(pos, pos, valid)
    assert seen is None and mask.tolist() == attention_mask(pos, pos, valid).tolist()
    # queries before every key see nothing: they may attend anywhere (a finite softmax), then are zeroed
    q_pos, k_pos = torch.tensor([[0, 1, 2]]), torch.tensor([[5, 6, 7]])
    mask, seen = visibility(q_pos, k_pos, None)
    assert not seen.any() and mask.all()
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    for impl in ("eager", "sdpa"):
        out, _ = attend(q, k, v, q_pos, k_pos, None, impl=impl)
        assert (out == 0).all()
