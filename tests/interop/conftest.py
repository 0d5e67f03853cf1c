"""Tiny random `transformers` models of every family, saved to folders, for the parity tests.

Weights are drawn wide (std 0.2, norms and biases perturbed too) so logits are O(1-10) and a wrong
mapping of any single tensor — a bias, a norm gain, one expert — moves them far beyond 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB, SEQ_LEN = 211, 48
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    pad_token_id=0, initializer_range=0.2,
)  # fmt: skip

# family -> (transformers config class, model class, config kwargs)
FAMILY_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt2": (
        "GPT2Config", "GPT2LMHeadModel",
        dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2,
             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2),
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_COMMON, attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_COMMON, sliding_window=16)),
    "mixtral": (
        "MixtralConfig", "MixtralForCausalLM",
        dict(_COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None, router_aux_loss_coef=0.02),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_COMMON, tie_word_embeddings=True)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_COMMON, sliding_window=24, original_max_position_embeddings=128)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_COMMON, head_dim=32, num_key_value_heads=1)),
}  # fmt: skip


@dataclass
class HFCase:
    model: Any  # the transformers model, eval mode
    folder: Path  # where it was saved


def widen(model: torch.nn.Module, seed: int = 0) -> None:
    """Redraw every weight with std 0.2 and perturb norm gains and biases, so nothing is left at a
    value (0 or 1) that a mapping mistake would reproduce by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.2
            if p.dim() == 1:
                p.add_(noise)
            else:
                p.copy_(noise)


def build_hf(family: str, overrides: dict[str, Any] | None = None, seed: int = 0):
    config_cls, model_cls, kwargs = FAMILY_CONFIGS[family]
    config = getattr(transformers, config_cls)(**{**kwargs, **(overrides or {})})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    widen(model, seed)
    return model.eval()


def make_case(family: str, folder: Path, overrides: dict[str, Any] | None = None, seed: int = 0) -> HFCase:
    model = build_hf(family, overrides, seed)
    model.save_pretrained(folder)
    return HFCase(model, folder)


def batch(seed: int = 1, batch_size: int = 2, seq_len: int = SEQ_LEN) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch_size, seq_len), generator=gen)


def left_padded(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second left-padded by 7 tokens: (ids, attention_mask)."""
    ids = batch(seed)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def hf_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' logits; with a mask, positions count from each row's first real token, as ours do."""
    kwargs: dict[str, Any] = {}
    if mask is not None:
        kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def hf() -> SimpleNamespace:
    """The helpers above (test modules cannot import conftest under --import-mode=importlib)."""
    return SimpleNamespace(
        transformers=transformers, VOCAB=VOCAB, SEQ_LEN=SEQ_LEN, build=build_hf, make_case=make_case, batch=batch,
        left_padded=left_padded, logits=hf_logits,
    )  # fmt: skip
