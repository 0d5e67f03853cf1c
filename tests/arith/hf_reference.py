"""Build the `transformers` model of a `ModelConfig` (test-only reference; the library never imports this).

Each family's HF config is written out by hand from our field names, so a mismatch in the mapping
shows up as a parameter-count difference rather than being hidden by shared code.
"""

from __future__ import annotations

import torch

from lmstack.config import ModelConfig


def hf_config(c: ModelConfig):
    import transformers as tf

    if c.family == "gpt2":
        assert c.norm == "layernorm" and c.position == "learned" and c.qkv_bias and c.out_bias and c.mlp_bias
        return tf.GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model, n_layer=c.n_layers,
            n_head=c.n_heads, n_inner=c.d_ff, activation_function="gelu_new",
            tie_word_embeddings=c.tie_embeddings, layer_norm_epsilon=c.norm_eps,
        )  # fmt: skip
    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
        tie_word_embeddings=c.tie_embeddings, rms_norm_eps=c.norm_eps,
    )  # fmt: skip
    if c.family == "llama":
        assert c.qkv_bias == c.out_bias  # Llama's attention_bias covers q, k, v and o together
        return tf.LlamaConfig(**common, head_dim=c.head_dim, attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    if c.family == "mistral":
        return tf.MistralConfig(**common, head_dim=c.head_dim, sliding_window=c.sliding_window)
    if c.family == "mixtral":
        return tf.MixtralConfig(
            **common,
            head_dim=c.head_dim,
            num_local_experts=c.n_experts,
            num_experts_per_tok=c.n_experts_per_token,
        )
    if c.family == "qwen2":
        assert c.qkv_bias and not c.out_bias  # Qwen2: biases on q, k, v only
        return tf.Qwen2Config(**common)
    if c.family == "phi3":
        return tf.Phi3Config(**common, sliding_window=c.sliding_window, pad_token_id=c.pad_id)
    if c.family == "gemma":
        return tf.GemmaConfig(**common, head_dim=c.head_dim, hidden_activation="gelu_pytorch_tanh")
    raise AssertionError(f"no HF mapping for family {c.family}")


def hf_model(c: ModelConfig, device: str = "meta", attn: str = "eager"):
    import transformers as tf

    cfg = hf_config(c)
    cfg._attn_implementation = attn
    with torch.device(device):
        return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
