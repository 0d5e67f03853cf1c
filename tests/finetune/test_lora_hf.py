"""LoRA/DoRA on lmstack's own model against PEFT on `transformers`' Llama holding the same weights:
an adapter folder saved by us gives PEFT the same logits, and PEFT's folder gives us its logits."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from lmstack.finetune.lora import LoraConfig, LoraLinear, apply_lora, load_adapter, merge_lora, save_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PROJECTIONS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip


def llama_name(path: str) -> str:
    """Our module path -> the Llama module path (interop's weight map, written out for Llama)."""
    match = re.fullmatch(r"blocks\.(\d+)\.(?:attn|mlp)\.(\w+)", path)
    return f"model.layers.{match[1]}.{PROJECTIONS[match[2]]}" if match else path


@pytest.fixture(scope="module")
def pair(tmp_path_factory, hf_llama_pair):
    """(lmstack model, transformers model) with the same random weights (std 0.2, logits O(1-10))."""
    ours, hf = hf_llama_pair(tmp_path_factory.mktemp("llama"))
    names = {n.rsplit(".", 1)[-1] for n, m in ours.named_modules() if isinstance(m, nn.Linear)}
    if not set(PROJECTIONS) <= names:
        pytest.skip(f"the model's linear layers are {sorted(names)}, not one per projection (q, k, v, o ...)")
    return ours, hf


def ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("use_dora", [False, True])
def test_our_adapter_folder_gives_peft_our_logits(pair, tmp_path, use_dora, random_adapters) -> None:
    base, hf = pair
    x = ids()
    torch.testing.assert_close(base(x), hf(input_ids=x).logits, rtol=0, atol=1e-4)  # same base
    ours = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, targets="all-linear", use_dora=use_dora))
    random_adapters(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path="tiny-llama", name_map=llama_name)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    got = ours(x)
    assert (got - base(x)).abs().max() > 0.5
    torch.testing.assert_close(got, theirs(input_ids=x).logits, rtol=0, atol=1e-4)
    merge_lora(ours)
    torch.testing.assert_close(ours(x), got, rtol=0, atol=1e-4)


def test_peft_folder_gives_us_peft_logits(pair, tmp_path) -> None:
    base, hf = pair
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=8, lora_alpha=4,
                             use_rslora=True, init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(hf), config).eval()
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(copy.deepcopy(base), tmp_path, name_map=llama_name)
    x = ids()
    assert sum(isinstance(m, LoraLinear) for m in ours.modules()) == 6
    torch.testing.assert_close(ours(x), theirs(input_ids=x).logits, rtol=0, atol=1e-4)
