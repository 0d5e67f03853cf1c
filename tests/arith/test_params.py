"""Parameter counts: equal to the lmstack model and the `transformers` model built on the meta device."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.arith import count_params
from lmstack.config import ModelConfig
from lmstack.presets import PRESETS

sys.path.insert(0, str(Path(__file__).parent))
from hf_reference import hf_model, n_params  # noqa: E402

# Published / `transformers` counts (issue 3).
REFERENCE = {
    "gpt2": 124_439_808,
    "llama2-7b": 6_738_415_616,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
}


def lmstack_meta(config: ModelConfig):
    from lmstack.model import build_model

    return build_model(config, device="meta")


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_totals(name):
    assert count_params(ModelConfig.preset(name)).total == REFERENCE[name]


def test_mixtral_active_with_embeddings_and_head():
    p = count_params(ModelConfig.preset("mixtral-8x7b"))
    assert p.active == 12_879_925_248
    # without the token embedding and the untied head (2 × 32000 × 4096)
    assert p.active_non_embedding == 12_879_925_248 - 2 * 32000 * 4096


@pytest.mark.parametrize("name", list(PRESETS))
def test_total_equals_lmstack_meta_model(name):
    config = ModelConfig.preset(name)
    assert count_params(config).total == n_params(lmstack_meta(config))


@pytest.mark.parametrize("name", list(PRESETS))
def test_total_equals_transformers_meta_model(name):
    config = ModelConfig.preset(name)
    assert count_params(config).total == n_params(hf_model(config))


@pytest.mark.parametrize("name", ["gpt2", "llama2-70b", "mixtral-8x7b", "qwen2-7b", "gemma-2b"])
def test_components_equal_lmstack_modules(name):
    """Each component against the module that holds it, so compensating errors cannot hide."""
    config = ModelConfig.preset(name)
    p, model = count_params(config), lmstack_meta(config)
    block = model.blocks[0]
    assert p.token_embedding == model.tok_emb.weight.numel()
    assert p.position_embedding == (model.pos_emb.weight.numel() if model.pos_emb is not None else 0)
    assert p.lm_head == (0 if config.tie_embeddings else model.lm_head.weight.numel())
    assert p.final_norm == n_params(model.norm)
    assert p.layer.attention == n_params(block.attn)
    assert p.layer.norms == n_params(block.attn_norm) + n_params(block.mlp_norm)
    assert p.layer.total == n_params(block)
    if config.is_moe:
        assert p.layer.router == n_params(block.mlp.router)
        assert p.layer.expert == n_params(block.mlp.experts[0])
        idle = config.n_experts - config.n_experts_per_token
        assert p.total - p.active == config.n_layers * idle * n_params(block.mlp.experts[0])
    else:
        assert p.layer.expert == n_params(block.mlp)
        assert p.active == p.total


@pytest.mark.parametrize("name", ["llama2-70b", "qwen2-7b", "gemma-2b"])
def test_q_k_v_o_and_biases_equal_transformers_projections(name):
    config = ModelConfig.preset(name)
    layer = count_params(config).layer
    attn = hf_model(config).model.layers[0].self_attn
    for key, module in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj)):
        assert getattr(layer, key) == module.weight.numel()
        assert getattr(layer, f"{key}_bias") == (module.bias.numel() if module.bias is not None else 0)


def test_tied_head_counted_once():
    tied = ModelConfig.preset("gpt2")
    untied = dataclasses.replace(tied, tie_embeddings=False)
    assert count_params(untied).total - count_params(tied).total == 50257 * 768
    assert count_params(tied).lm_head == 0
    assert count_params(untied).non_embedding == count_params(tied).non_embedding


def test_gqa_shrinks_only_k_and_v():
    gqa = ModelConfig.preset("llama2-70b")
    mha = dataclasses.replace(gqa, n_kv_heads=gqa.n_heads)
    saved = count_params(mha).layer.attention - count_params(gqa).layer.attention
    assert saved == 2 * 8192 * (8192 - 8 * 128)


# ---- property: any valid config, lmstack's model has exactly the counted parameters -----------------
@st.composite
def configs(draw):
    n_kv = draw(st.sampled_from([1, 2, 4]))
    n_heads = n_kv * draw(st.integers(1, 3))
    head_dim = 2 * draw(st.integers(1, 6))
    n_experts = draw(st.sampled_from([0, 0, 2, 4]))
    return ModelConfig(
        vocab_size=draw(st.integers(1, 300)),
        d_model=draw(st.integers(1, 48)),
        n_layers=draw(st.integers(1, 3)),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        d_ff=draw(st.integers(1, 64)),
        max_seq_len=draw(st.integers(1, 64)),
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        norm_placement=draw(st.sampled_from(["pre", "post"])),
        mlp=draw(st.sampled_from(["gelu", "gelu_tanh", "relu", "swiglu", "geglu"])),
        position=draw(st.sampled_from(["learned", "rope", "alibi", "sinusoidal", "none"])),
        qkv_bias=draw(st.booleans()),
        out_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()),
        n_experts=n_experts,
        n_experts_per_token=draw(st.integers(1, n_experts)) if n_experts else 2,
    )


@settings(max_examples=60, deadline=None)
@given(configs())
def test_any_config_matches_lmstack_meta_model(config):
    p = count_params(config)
    model = lmstack_meta(config)
    assert p.total == n_params(model)
    assert p.embedding == model.tok_emb.weight.numel() + (
        model.pos_emb.weight.numel() if model.pos_emb is not None else 0
    )
