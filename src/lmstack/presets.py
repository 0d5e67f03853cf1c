"""Named presets: the exact published hyperparameters of each model, as data.

Each entry mirrors the `config.json` of the Hugging Face repository named in `hf_repo`. `tiny` and
`small` are Llama-family configs sized to train on a laptop CPU; their vocabulary size is replaced by
the tokenizer's when training.
"""

from __future__ import annotations

from typing import Any

_GPT2 = dict(
    family="gpt2", vocab_size=50257, max_seq_len=1024, norm="layernorm", norm_eps=1e-5, mlp="gelu_tanh",
    position="learned", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
    bos_id=50256, eos_id=50256,
)  # fmt: skip
_LLAMA = dict(
    family="llama", vocab_size=32000, norm="rmsnorm", mlp="swiglu", position="rope", bos_id=1, eos_id=2
)
_LLAMA3 = dict(_LLAMA, vocab_size=128256, rope_theta=500000.0, bos_id=128000, eos_id=128001)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2, d_model=768, n_layers=12, n_heads=12, d_ff=3072, hf_repo="openai-community/gpt2"),
    "gpt2-medium": dict(_GPT2, d_model=1024, n_layers=24, n_heads=16, d_ff=4096, hf_repo="openai-community/gpt2-medium"),
    "gpt2-large": dict(_GPT2, d_model=1280, n_layers=36, n_heads=20, d_ff=5120, hf_repo="openai-community/gpt2-large"),
    "gpt2-xl": dict(_GPT2, d_model=1600, n_layers=48, n_heads=25, d_ff=6400, hf_repo="openai-community/gpt2-xl"),
    "llama-7b": dict(
        _LLAMA, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_seq_len=2048, norm_eps=1e-6,
        hf_repo="huggyllama/llama-7b",
    ),
    "llama2-7b": dict(
        _LLAMA, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_seq_len=4096, hf_repo="meta-llama/Llama-2-7b-hf"
    ),
    "llama2-13b": dict(
        _LLAMA, d_model=5120, n_layers=40, n_heads=40, d_ff=13824, max_seq_len=4096, hf_repo="meta-llama/Llama-2-13b-hf"
    ),
    "llama2-70b": dict(
        _LLAMA, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672, max_seq_len=4096,
        hf_repo="meta-llama/Llama-2-70b-hf",
    ),
    "llama3-8b": dict(
        _LLAMA3, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, max_seq_len=8192,
        hf_repo="meta-llama/Meta-Llama-3-8B",
    ),
    "llama3-70b": dict(
        _LLAMA3, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672, max_seq_len=8192,
        hf_repo="meta-llama/Meta-Llama-3-70B",
    ),
    "llama3.1-8b": dict(
        _LLAMA3, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, max_seq_len=131072,
        rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
        rope_original_max_seq_len=8192, hf_repo="meta-llama/Llama-3.1-8B",
    ),
    "mistral-7b": dict(
        _LLAMA, family="mistral", d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
        max_seq_len=32768, sliding_window=4096, hf_repo="mistralai/Mistral-7B-v0.1",
    ),
    "mixtral-8x7b": dict(
        _LLAMA, family="mixtral", d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
        max_seq_len=32768, rope_theta=1e6, n_experts=8, n_experts_per_token=2, router_aux_loss_coef=0.02,
        hf_repo="mistralai/Mixtral-8x7B-v0.1",
    ),
    "qwen2-7b": dict(
        _LLAMA, family="qwen2", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff=18944,
        max_seq_len=131072, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True, bos_id=151643, eos_id=151643,
        hf_repo="Qwen/Qwen2-7B",
    ),
    "phi3-mini": dict(
        _LLAMA, family="phi3", vocab_size=32064, d_model=3072, n_layers=32, n_heads=32, d_ff=8192, max_seq_len=4096,
        sliding_window=2047, eos_id=32000, pad_id=32000, hf_repo="microsoft/Phi-3-mini-4k-instruct",
    ),
    "gemma-2b": dict(
        _LLAMA, family="gemma", vocab_size=256000, d_model=2048, n_layers=18, n_heads=8, n_kv_heads=1, head_dim=256,
        d_ff=16384, max_seq_len=8192, norm_eps=1e-6, norm_unit_offset=True, mlp="geglu", tie_embeddings=True,
        embedding_scale=2048**0.5, bos_id=2, eos_id=1, pad_id=0, hf_repo="google/gemma-2b",
    ),
    "tinyllama-1.1b": dict(
        _LLAMA, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632, max_seq_len=2048,
        hf_repo="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
    ),
    # Laptop-sized Llama-family models; checkpoints load in `transformers` as LlamaForCausalLM.
    "tiny": dict(
        _LLAMA, vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=256,
        tie_embeddings=True, bos_id=None, eos_id=None,
    ),
    # `small` is sized for the 10-minute CPU main job: at equal compute a 192-wide model learned faster
    # than 256- or 384-wide ones (validation loss after ~1.3e13 FLOPs).
    "small": dict(
        _LLAMA, vocab_size=4096, d_model=192, n_layers=6, n_heads=6, n_kv_heads=2, d_ff=512, max_seq_len=256,
        tie_embeddings=True, bos_id=None, eos_id=None,
    ),
}  # fmt: skip
