"""Reference models for the inference tests: tiny `transformers` models of every supported family and the
same weights in an lmstack `Transformer`, mapped directly (state-dict name tables below), in float64 so
near-ties cannot flip a greedy choice. Weights use std 0.2 so logits are O(1-10) and greedy paths vary.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.model import build_model

HF_FAMILIES = ("gpt2", "llama", "mistral", "mixtral", "qwen2", "phi3", "gemma")
VOCAB = 97
CTX = 96


def _hf_config(family: str, eos_id: int | None):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CTX,
                  initializer_range=0.2, eos_token_id=eos_id, bos_token_id=None, pad_token_id=0)  # fmt: skip
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=CTX, initializer_range=0.2,
                             eos_token_id=eos_id, bos_token_id=None, pad_token_id=0)  # fmt: skip
    if family == "llama":
        return tf.LlamaConfig(**common, rms_norm_eps=1e-6)
    if family == "mistral":
        return tf.MistralConfig(**common, rms_norm_eps=1e-6, sliding_window=8)
    if family == "mixtral":
        return tf.MixtralConfig(**common, rms_norm_eps=1e-5, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2":
        return tf.Qwen2Config(**common, rms_norm_eps=1e-6)
    if family == "phi3":
        return tf.Phi3Config(**common, rms_norm_eps=1e-5)
    if family == "gemma":
        return tf.GemmaConfig(**common, rms_norm_eps=1e-6, head_dim=8)
    raise KeyError(family)


def _our_config(family: str, eos_id: int | None) -> ModelConfig:
    base = dict(family=family, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                max_seq_len=CTX, eos_id=eos_id, pad_id=0)  # fmt: skip
    if family == "gpt2":
        return ModelConfig(**dict(base, n_kv_heads=4, d_ff=128), norm="layernorm", norm_eps=1e-5, mlp="gelu_tanh",
                           position="learned", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True)  # fmt: skip
    extra = {
        "llama": dict(norm_eps=1e-6),
        "mistral": dict(norm_eps=1e-6, sliding_window=8),
        "mixtral": dict(norm_eps=1e-5, rope_theta=1e6, n_experts=4, n_experts_per_token=2),
        "qwen2": dict(norm_eps=1e-6, qkv_bias=True),
        "phi3": dict(norm_eps=1e-5),
        "gemma": dict(
            norm_eps=1e-6,
            head_dim=8,
            norm_unit_offset=True,
            embedding_scale=math.sqrt(32),
            mlp="geglu",
            tie_embeddings=True,
        ),  # fmt: skip
    }[family]
    return ModelConfig(**base, **extra)


def _map_state_dict(family: str, hf_sd: dict, config: ModelConfig) -> dict:
    """HF parameter names -> lmstack's (fused HF q/k/v and gate/up tensors hold ours stacked on rows)."""
    out = {}
    if family == "gpt2":
        t = lambda name: hf_sd[name].t()  # GPT-2's Conv1D stores (in, out)
        out["tok_emb.weight"] = hf_sd["transformer.wte.weight"]
        out["pos_emb.weight"] = hf_sd["transformer.wpe.weight"]
        for i in range(config.n_layers):
            h, b = f"transformer.h.{i}.", f"blocks.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[b + ours + ".weight"], out[b + ours + ".bias"] = (
                    hf_sd[h + theirs + ".weight"],
                    hf_sd[h + theirs + ".bias"],
                )
            sizes = (config.q_dim, config.kv_dim, config.kv_dim)
            for p, w, bias in zip(
                "qkv", t(h + "attn.c_attn.weight").split(sizes), hf_sd[h + "attn.c_attn.bias"].split(sizes)
            ):
                out[b + f"attn.{p}.weight"], out[b + f"attn.{p}.bias"] = w, bias
            out[b + "attn.o.weight"], out[b + "attn.o.bias"] = (
                t(h + "attn.c_proj.weight"),
                hf_sd[h + "attn.c_proj.bias"],
            )
            out[b + "mlp.up.weight"], out[b + "mlp.up.bias"] = (
                t(h + "mlp.c_fc.weight"),
                hf_sd[h + "mlp.c_fc.bias"],
            )
            out[b + "mlp.down.weight"], out[b + "mlp.down.bias"] = (
                t(h + "mlp.c_proj.weight"),
                hf_sd[h + "mlp.c_proj.bias"],
            )
        out["norm.weight"], out["norm.bias"] = (
            hf_sd["transformer.ln_f.weight"],
            hf_sd["transformer.ln_f.bias"],
        )
        return out
    out["tok_emb.weight"] = hf_sd["model.embed_tokens.weight"]
    out["norm.weight"] = hf_sd["model.norm.weight"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = hf_sd["lm_head.weight"]
    for i in range(config.n_layers):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        out[b + "attn_norm.weight"] = hf_sd[h + "input_layernorm.weight"]
        out[b + "mlp_norm.weight"] = hf_sd[h + "post_attention_layernorm.weight"]
        out[b + "attn.o.weight"] = hf_sd[h + "self_attn.o_proj.weight"]
        if family == "phi3":
            sizes = (config.q_dim, config.kv_dim, config.kv_dim)
            for p, w in zip("qkv", hf_sd[h + "self_attn.qkv_proj.weight"].split(sizes)):
                out[b + f"attn.{p}.weight"] = w
            gate, up = hf_sd[h + "mlp.gate_up_proj.weight"].chunk(2, dim=0)
            out[b + "mlp.gate.weight"], out[b + "mlp.up.weight"] = gate, up
            out[b + "mlp.down.weight"] = hf_sd[h + "mlp.down_proj.weight"]
            continue
        for p in "qkv":
            out[b + f"attn.{p}.weight"] = hf_sd[h + f"self_attn.{p}_proj.weight"]
            if config.qkv_bias:
                out[b + f"attn.{p}.bias"] = hf_sd[h + f"self_attn.{p}_proj.bias"]
        if family == "mixtral":
            out[b + "mlp.router.weight"] = hf_sd[h + "mlp.gate.weight"]
            gate_up, down = hf_sd[h + "mlp.experts.gate_up_proj"], hf_sd[h + "mlp.experts.down_proj"]
            for e in range(config.n_experts):
                gate, up = gate_up[e].chunk(2, dim=0)
                out[b + f"mlp.experts.{e}.gate.weight"], out[b + f"mlp.experts.{e}.up.weight"] = gate, up
                out[b + f"mlp.experts.{e}.down.weight"] = down[e]
        else:
            for p in ("gate", "up", "down"):
                out[b + f"mlp.{p}.weight"] = hf_sd[h + f"mlp.{p}_proj.weight"]
    return out


def build_pair(family: str, *, eos_id: int | None = None, seed: int = 0, dtype=torch.float64):
    """A tiny HF model and the lmstack model with the same weights, both in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    kwargs = {"experts_implementation": "eager"} if family == "mixtral" else {}
    # sdpa: HF's eager attention turns fully masked padding rows into NaN in float64
    hf = (
        tf.AutoModelForCausalLM.from_config(_hf_config(family, eos_id), attn_implementation="sdpa", **kwargs)
        .to(dtype)
        .eval()
    )
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_((0.0 if family == "gemma" else 1.0) + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif family == "gemma" and "embed" in name:  # scaled by sqrt(d) and tied: keep it from dominating
                p.normal_(0.0, 0.05)
            else:
                p.normal_(0.0, 0.2)
    hf.generation_config.eos_token_id = eos_id
    hf.generation_config.pad_token_id = 0
    config = _our_config(family, eos_id)
    ours = build_model(config, dtype=dtype)
    missing, unexpected = ours.load_state_dict(_map_state_dict(family, hf.state_dict(), config), strict=True)
    assert not missing and not unexpected
    return hf, ours.eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine spinning OpenMP workers
    make small ops 10x slower; run this directory's tests single-threaded and restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def hf_pair():
    built: dict = {}

    def get(family: str, eos_id: int | None = None, seed: int = 0):
        key = (family, eos_id, seed)
        if key not in built:
            built[key] = build_pair(family, eos_id=eos_id, seed=seed)
        return built[key]

    return get


def tiny_model(*, vocab: int = 61, seed: int = 0, dtype=torch.float64, std: float = 0.2, **overrides):
    """A small random lmstack model (Llama-style unless overridden) with sharp logits."""
    fields = dict(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128)
    fields.update(overrides)
    model = build_model(ModelConfig(**fields), dtype=dtype, seed=seed)
    with torch.no_grad():
        torch.manual_seed(seed)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    return model.eval()


@pytest.fixture(scope="session")
def make_tiny():
    return tiny_model
