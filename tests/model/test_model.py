"""Whole-model properties: implementations agree end to end, MoE routes sparsely, positions behave."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmstack import ModelConfig, build_model
from lmstack.model.moe import MoE, load_balancing_loss

BASE = ModelConfig(
    vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=96, max_seq_len=64, family="llama"
)
VARIANTS = {
    "llama_gqa": BASE,
    "mqa_window": dataclasses.replace(BASE, n_kv_heads=1, sliding_window=5),
    "gpt2_like": dataclasses.replace(
        BASE, norm="layernorm", mlp="gelu_tanh", position="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
        n_kv_heads=6, tie_embeddings=True, family="gpt2",
    ),
    "alibi_post_norm_relu": dataclasses.replace(BASE, position="alibi", norm_placement="post", mlp="relu"),
    "sinusoidal_geglu_gemma_norm": dataclasses.replace(
        BASE, position="sinusoidal", mlp="geglu", norm_unit_offset=True, embedding_scale=48**0.5
    ),
    "moe": dataclasses.replace(BASE, n_experts=4, n_experts_per_token=2, router_aux_loss_coef=0.01),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_attention_impls_agree_through_the_model(name):
    model = build_model(VARIANTS[name], seed=0, dtype=torch.float64)
    model.reset_parameters(std=0.2)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    results = {}
    for impl in ("eager", "sdpa", "flash"):
        model.set_attn_impl(impl)
        model.zero_grad()
        logits = model(ids)
        logits.logsumexp(-1).sum().backward()
        results[impl] = logits.detach(), [p.grad.clone() for p in model.parameters()]
    assert results["eager"][0].abs().max() > 1.0, "weights should be wide enough for O(1) logits"
    for impl in ("sdpa", "flash"):
        torch.testing.assert_close(results[impl][0], results["eager"][0])
        for got, want in zip(results[impl][1], results["eager"][1]):
            torch.testing.assert_close(got, want)


def test_left_padding_gives_the_same_logits_as_unpadded():
    model = build_model(BASE, seed=0, dtype=torch.float64)
    model.reset_parameters(std=0.2)
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(2))
    alone = model(ids)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 10)], dim=1).long()
    for impl in ("eager", "sdpa", "flash"):
        model.set_attn_impl(impl)
        out = model(padded, attention_mask=mask)
        torch.testing.assert_close(out[:, 4:], alone)
        assert torch.isfinite(out).all()


def test_moe_runs_only_selected_experts_and_matches_dense_mixture():
    config = dataclasses.replace(BASE, n_experts=4, n_experts_per_token=2)
    moe = MoE(config).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    calls = []
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, inp, out, e=e: calls.append((e, inp[0].shape[0])))
    out, logits = moe(x)
    # hand computation: softmax over experts, keep the top 2, renormalise, mix every expert densely
    flat = x.reshape(-1, 48)
    probs = torch.softmax(flat @ moe.router.weight.T, -1)
    top = probs.topk(2, -1)
    expected = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        w = top.values[n] / top.values[n].sum()
        for slot in range(2):
            expected[n] += w[slot] * moe.experts[int(top.indices[n, slot])](flat[n : n + 1])[0]
    torch.testing.assert_close(out.reshape(-1, 48), expected)
    # each expert saw exactly the tokens routed to it (sparse), and each token two experts
    calls_before_check = calls[: len(set(top.indices.flatten().tolist()))]
    routed = torch.bincount(top.indices.flatten(), minlength=4)
    assert {e: n for e, n in calls_before_check} == {e: int(routed[e]) for e in range(4) if routed[e] > 0}
    assert logits.shape == (10, 4)


def test_balancing_loss_is_one_when_routing_is_uniform():
    # uniform probabilities and perfectly balanced selections: E · Σ (k/E)(1/E) = k
    logits = [torch.zeros(8, 4)]
    assert load_balancing_loss(logits, 4, 2).item() == pytest.approx(2.0)
    skewed = [torch.tensor([[5.0, 4.0, 0.0, 0.0]] * 8)]
    assert load_balancing_loss(skewed, 4, 2).item() > 2.0


def test_model_exposes_aux_loss_for_moe_only():
    ids = torch.randint(0, 97, (2, 8))
    dense = build_model(BASE, seed=0)
    dense(ids)
    assert dense.aux_loss is None
    moe = build_model(VARIANTS["moe"], seed=0)
    moe(ids)
    assert moe.aux_loss is not None and moe.aux_loss.requires_grad


def test_gradient_checkpointing_gives_identical_gradients():
    model = build_model(BASE, seed=0, dtype=torch.float64)
    ids = torch.randint(0, 97, (2, 16))
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bad_inputs_raise_clear_errors():
    model = build_model(VARIANTS["gpt2_like"], seed=0)
    with pytest.raises(ValueError, match="input_ids must be"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="past max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown attn_impl"):
        model.set_attn_impl("xformers")
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))


def test_seeded_builds_are_reproducible():
    a = build_model(BASE, seed=3)
    b = build_model(BASE, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_layernorm_with_unit_offset_runs_in_bfloat16():
    config = dataclasses.replace(BASE, norm="layernorm", norm_unit_offset=True)
    model = build_model(config, seed=0, dtype=torch.bfloat16)
    assert model(torch.randint(0, 97, (1, 8))).dtype == torch.bfloat16


def test_all_layers_of_a_forward_share_one_mask(monkeypatch):
    from lmstack.infer.cache import make_cache
    from lmstack.model import attention

    model = build_model(BASE, seed=0).eval()
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    pad = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    expected = model(ids, attention_mask=pad)
    builds = []
    real = attention.visibility
    monkeypatch.setattr(attention, "visibility", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    got = model(ids, attention_mask=pad, cache=make_cache("static", BASE, 2, 8, dtype=torch.float32))
    assert len(builds) == 1, "one mask for both layers of one call"
    torch.testing.assert_close(got, expected)


def test_masked_forward_traces_as_one_graph_under_compile():
    # visibility's cheap-case branches depend on data; under torch.compile they must step aside
    model = build_model(VARIANTS["mqa_window"], seed=0)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids), model(ids))
