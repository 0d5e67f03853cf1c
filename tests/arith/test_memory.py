"""Memory: quantised weight sizes, training state and ZeRO sharding, activations, LoRA."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from lmstack.arith import (
    activation_bytes,
    count_params,
    korthikanti_layer_bytes,
    lora_memory,
    lora_params,
    sharded_training_bytes,
    training_bytes_per_param,
    weights_bytes,
)
from lmstack.arith.memory import BITS, layer_activation_bytes
from lmstack.config import ModelConfig

sys.path.insert(0, str(Path(__file__).parent))
from hf_reference import hf_model  # noqa: E402


def test_format_bits():
    assert BITS["nf4"] == 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125  # QLoRA paper: 0.127 bits of constants
    assert BITS["q4_0"] == 4.5  # GGUF Q4_0: 18 bytes (fp16 scale + 32 nibbles) per 32 weights


@pytest.mark.parametrize("name", ["llama2-7b", "mixtral-8x7b", "gpt2", "gemma-2b"])
def test_quantisable_weights_are_the_blocks_linear_matrices(name):
    """Only Linear weight matrices inside blocks (router excluded) are stored in low precision."""
    from lmstack.model import build_model

    config = ModelConfig.preset(name)
    model = build_model(config, device="meta")
    linear = sum(
        m.weight.numel()
        for n, m in model.blocks.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("router")
    )
    p = count_params(config)
    assert p.quantisable == linear
    assert weights_bytes(config, "bf16") == 2 * p.total
    assert weights_bytes(config, "fp32") == 4 * p.total
    assert weights_bytes(config, "int4") == linear // 2 + 2 * (p.total - linear)
    assert weights_bytes(config, "q4_0") == linear * 18 // 32 + 2 * (p.total - linear)


def test_training_state_is_16_bytes_per_param_for_mixed_precision_adamw():
    assert training_bytes_per_param("adamw") == 16  # 2 + 2 + 4 + 4 + 4
    assert training_bytes_per_param("adamw", mixed_precision=False) == 16  # 4 + 4 + 4 + 4
    assert training_bytes_per_param("adamw8bit") == 10
    assert training_bytes_per_param("sgd") == 8


def test_zero_stages_match_the_paper_example():
    """Rajbhandari et al. 2020, Figure 1: Ψ = 7.5B, N_d = 64, K = 12 -> 120, 31.4, 16.6, 1.9 GB."""
    n, gpus = 7.5e9, 64
    got = {s: sharded_training_bytes(n, gpus, s) / 1e9 for s in ("ddp", "zero1", "zero2", "zero3")}
    assert got["ddp"] == pytest.approx(120)
    assert got["zero1"] == pytest.approx(31.4, abs=0.05)
    assert got["zero2"] == pytest.approx(16.6, abs=0.05)
    assert got["zero3"] == pytest.approx(1.9, abs=0.05)


def test_activations_reduce_to_korthikanti_for_a_gpt_block():
    """With dropout, MHA, d_ff = 4d and an ungated MLP the accounting is the paper's s·b·h·(34 + 5as/h)."""
    gpt = ModelConfig(
        vocab_size=50257, d_model=1024, n_layers=24, n_heads=16, d_ff=4096, max_seq_len=2048, norm="layernorm",
        mlp="gelu", position="learned", qkv_bias=True, out_bias=True, mlp_bias=True, dropout=0.1, family="gpt2",
    )  # fmt: skip
    for b, s in ((1, 128), (8, 2048)):
        assert sum(layer_activation_bytes(gpt, b, s)) == korthikanti_layer_bytes(b, s, 1024, 16)


def test_activation_checkpointing_orders():
    config = ModelConfig.preset("llama2-7b")
    none, selective, full = (activation_bytes(config, 8, 2048, m) for m in ("none", "selective", "full"))
    assert full < selective < none
    linear, square = layer_activation_bytes(config, 8, 2048)
    assert none - selective == 32 * square  # selective drops exactly the s² terms
    assert square == 2 * 8 * 32 * 2048 * 2048  # bf16 softmax output, no dropout


def test_activation_formula_is_near_what_autograd_saves():
    """A sanity bound, not an equality: eager PyTorch also saves fp32 norm internals, RoPE tables and
    pre-softmax scores, which the Megatron accounting omits. Measured per added block, bf16."""
    from lmstack.model import build_model

    def saved_bytes(config, b, s):
        model = build_model(config, seed=0, dtype=torch.bfloat16, attn_impl="eager")
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randint(0, config.vocab_size, (b, s)))
        return sum(seen.values())

    base = ModelConfig(
        vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160, max_seq_len=128
    )
    deeper = dataclasses.replace(base, n_layers=4)
    b, s = 2, 64
    measured = (saved_bytes(deeper, b, s) - saved_bytes(base, b, s)) / 2
    formula = sum(layer_activation_bytes(base, b, s))
    assert 0.8 * formula <= measured <= 2 * formula


def test_lora_params_equal_adapter_shapes_of_the_transformers_modules():
    """A (d_in × r) + B (r × d_out) on each targeted `transformers` Linear, counted on the meta model."""
    for name in ("llama2-7b", "llama2-70b", "mistral-7b"):
        config = ModelConfig.preset(name)
        model = hf_model(config)
        for targets, suffixes in (((("q", "v")), ("q_proj", "v_proj")), (("q", "k", "v", "o"), ("q_proj", "k_proj", "v_proj", "o_proj")),
                                  (("gate", "up", "down"), ("gate_proj", "up_proj", "down_proj"))):  # fmt: skip
            expected = sum(
                16 * (m.in_features + m.out_features)
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)
            )
            assert lora_params(config, 16, targets) == expected


def test_qlora_memory_uses_nf4_base():
    config = ModelConfig.preset("llama2-7b")
    q, full = lora_memory(config, 16, base_dtype="nf4"), lora_memory(config, 16)
    assert q["base_weights_bytes"] == weights_bytes(config, "nf4")
    assert q["adapter_training_bytes"] == full["adapter_training_bytes"] == 16 * 8_388_608
    assert q["alpha"] == 32
