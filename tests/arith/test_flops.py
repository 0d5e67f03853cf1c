"""FLOPs: `forward_flops` equals `FlopCounterMode` on real eager forward passes (lmstack and transformers)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmstack.arith import (
    attended_pairs,
    count_params,
    decode_flops_per_token,
    forward_flops,
    forward_per_token,
    seed_attention_layer_flops,
)
from lmstack.config import ModelConfig

sys.path.insert(0, str(Path(__file__).parent))
from hf_reference import hf_config  # noqa: E402

_GPT2 = dict(family="gpt2", norm="layernorm", mlp="gelu_tanh", position="learned", qkv_bias=True, out_bias=True,
             mlp_bias=True, tie_embeddings=True)  # fmt: skip
_SMALL = dict(vocab_size=101, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64)
SMALL = {
    "gpt2-mha-tied": ModelConfig(**dict(_SMALL, **_GPT2, vocab_size=97, d_ff=64)),
    "llama-mha-untied": ModelConfig(**_SMALL),
    "llama-gqa-tied": ModelConfig(**_SMALL, n_kv_heads=2, tie_embeddings=True),
    "mistral-mqa-window": ModelConfig(**_SMALL, family="mistral", n_kv_heads=1, sliding_window=5),
    "mixtral-moe-top2": ModelConfig(**_SMALL, family="mixtral", n_kv_heads=2, n_experts=4, n_experts_per_token=2),
    "moe-top1-tied": ModelConfig(**_SMALL, n_experts=3, n_experts_per_token=1, tie_embeddings=True),
    "qwen2-qkv-bias": ModelConfig(**_SMALL, family="qwen2", n_kv_heads=2, qkv_bias=True),
    "gemma-geglu-headdim": ModelConfig(**_SMALL, family="gemma", n_kv_heads=1, head_dim=16, mlp="geglu", tie_embeddings=True),
    "phi3-mha-window": ModelConfig(**_SMALL, family="phi3", sliding_window=7),
    "relu-postnorm-alibi": ModelConfig(**_SMALL, mlp="relu", norm_placement="post", position="alibi", mlp_bias=True),
}  # fmt: skip
# configs a `transformers` class expresses exactly (no MoE outside Mixtral, no ALiBi)
HF_EXPRESSIBLE = [
    n for n, c in SMALL.items() if (c.family == "mixtral") == c.is_moe and c.position != "alibi"
]
CONTEXT, BATCH = 16, 2


def counted_flops(model: torch.nn.Module, config: ModelConfig) -> int:
    ids = torch.randint(0, config.vocab_size, (BATCH, CONTEXT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(SMALL))
def test_forward_flops_equal_lmstack_eager_forward(name):
    from lmstack.model import build_model

    config = SMALL[name]
    model = build_model(config, attn_impl="eager", seed=0)
    expected = BATCH * forward_flops(config, CONTEXT).total
    assert counted_flops(model, config) == expected
    assert BATCH * CONTEXT * forward_per_token(config, CONTEXT) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", HF_EXPRESSIBLE)
def test_forward_flops_equal_transformers_eager_forward(name):
    import transformers

    config = SMALL[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config(config), attn_implementation="eager", experts_implementation="eager"
    )
    assert counted_flops(model, config) == BATCH * forward_flops(config, CONTEXT).total


def test_moe_counts_only_top_k_experts():
    moe = SMALL["mixtral-moe-top2"]
    dense = dataclasses.replace(moe, n_experts=0)
    per_layer_extra = 2 * CONTEXT * moe.d_model * moe.n_experts  # router
    per_layer_extra += 2 * CONTEXT * 3 * moe.d_model * moe.d_ff  # one more expert (k=2) than the dense MLP
    assert (
        forward_flops(moe, CONTEXT).total - forward_flops(dense, CONTEXT).total
        == moe.n_layers * per_layer_extra
    )


def test_tied_head_still_multiplies():
    tied = SMALL["llama-gqa-tied"]
    untied = dataclasses.replace(tied, tie_embeddings=False)
    assert forward_flops(tied, CONTEXT).total == forward_flops(untied, CONTEXT).total


@pytest.mark.parametrize("window", [None, 1, 3, 16, 40])
@pytest.mark.parametrize("causal", [False, True])
def test_attended_pairs_equal_the_mask_rule(causal, window):
    """Causal pair counts follow `lmstack.model.masks.sees`, the one visibility rule of the package."""
    from lmstack.model.masks import sees

    pos = torch.arange(CONTEXT)
    mask = sees(pos[:, None], pos[None, :], causal=True, window=window)
    expected = int(mask.sum()) if causal else CONTEXT * CONTEXT
    assert attended_pairs(CONTEXT, causal=causal, window=window if causal else None) == expected


def test_seed_formula_is_mha_attention():
    """Seed 002: 8sd² + 4s²d for one MHA layer = projections + scores + values of our count."""
    config = ModelConfig.preset("llama2-7b")
    one = dataclasses.replace(config, n_layers=1)
    f = forward_flops(one, 2048)
    assert f.attention_projections + f.attention_scores + f.attention_values == seed_attention_layer_flops(
        2048, 4096
    )


def test_decode_token_is_the_causal_increment():
    """One more token under causal counting costs exactly one decode step at that position."""
    for config in (SMALL["llama-gqa-tied"], SMALL["mistral-mqa-window"], SMALL["mixtral-moe-top2"]):
        for s in (1, 4, 5, 6, 20):
            step = forward_flops(config, s, causal=True).total - (
                forward_flops(config, s - 1, causal=True).total if s > 1 else 0
            )
            assert decode_flops_per_token(config, s) == step


def test_matmul_weights_are_half_the_non_attention_flops():
    config = ModelConfig.preset("mixtral-8x7b")
    f = forward_flops(config, 1)
    attention_core = f.attention_scores + f.attention_values
    assert f.total - attention_core == 2 * count_params(config).matmul_weights_per_token
