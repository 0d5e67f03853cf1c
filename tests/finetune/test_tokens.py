"""Trainable token rows (PEFT's `trainable_token_indices`): only the chosen rows train, a tied head
trains with its embedding, and the adapter folder gives PEFT on `transformers` our logits (and PEFT's
folder gives us its logits), for a tied and an untied head."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lmstack.errors import InputError
from lmstack.finetune.adapters import hf_module_names, load_peft_folder
from lmstack.finetune.lora import LoraConfig, LoraLinear, apply_lora, save_adapter, trainable_parameters
from lmstack.finetune.tokens import (
    TokenEmbedding,
    TokenHead,
    apply_token_rows,
    peft_token_rows,
    unload_token_rows,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB, NEW = 97, [96, 94, 95]  # the "new" rows, deliberately not in order (PEFT keeps the given order)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path_factory, hf_llama_pair):
    """(lmstack model, transformers Llama) with the same random weights (std 0.2, logits O(1-10))."""
    ours, hf = hf_llama_pair(tmp_path_factory.mktemp("llama"), vocab=VOCAB, tied=request.param)
    ours.eval()
    assert (ours.lm_head.weight is ours.tok_emb.weight) == request.param
    return ours, hf


def ids() -> torch.Tensor:
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    x[:, ::3] = torch.tensor(NEW[:2])[:, None]  # the new tokens appear in the input
    return x


def adapted(base: nn.Module) -> nn.Module:
    """LoRA on q, v with nonzero B, and random trained values in the new rows."""
    model = apply_token_rows(apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8)), NEW)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLinear):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
        for layer in (model.tok_emb, model.lm_head):
            layer.token_rows.copy_(torch.randn(layer.token_rows.shape, generator=g))
    return model


def test_our_folder_gives_peft_our_logits(pair, tmp_path):
    base, hf = pair
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(base(x), hf(input_ids=x).logits, rtol=0, atol=1e-4)
        ours = adapted(base)
        names = hf_module_names(ours)
        tensors, extra = peft_token_rows(ours, names)
        save_adapter(ours, tmp_path, name_map=names, extra_tensors=tensors, extra_config=extra)
        saved = load_file(str(tmp_path / "adapter_model.safetensors"))
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        tied = ours.lm_head.weight is ours.tok_emb.weight
        expected = {"model.embed_tokens": NEW} if tied else {"model.embed_tokens": NEW, "lm_head": NEW}
        assert config["trainable_token_indices"] == expected
        assert saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape == (
            3,
            64,
        )
        assert ("base_model.model.lm_head.token_adapter.trainable_tokens_delta" in saved) == (not tied)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
        got = ours(x)
        lora_only = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8))
        for a, b in zip(lora_only.modules(), ours.modules()):
            if isinstance(a, LoraLinear):
                a.lora_B.copy_(b.lora_B)
        assert (got - lora_only(x)).abs().max() > 0.5  # the token rows matter
        torch.testing.assert_close(got, theirs(input_ids=x).logits, rtol=0, atol=1e-4)
        # and back into lmstack, onto a fresh base: the same logits
        again = load_peft_folder(copy.deepcopy(base), tmp_path)
        torch.testing.assert_close(again(x), got, rtol=0, atol=1e-6)


def test_peft_folder_gives_us_peft_logits(pair, tmp_path):
    base, hf = pair
    tied = base.lm_head.weight is base.tok_emb.weight
    rows = NEW if tied else {"embed_tokens": NEW, "lm_head": NEW}
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False,
                             trainable_token_indices=rows, task_type="CAUSAL_LM")  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(hf), config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                p.normal_(0, 1, generator=torch.Generator().manual_seed(len(name)))
    theirs.save_pretrained(str(tmp_path))
    ours = load_peft_folder(copy.deepcopy(base), tmp_path)
    assert isinstance(ours.tok_emb, TokenEmbedding) and isinstance(ours.lm_head, TokenHead)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(input_ids=x).logits, rtol=0, atol=1e-4)


def test_only_the_new_rows_train(pair):
    base, _ = pair
    tied = base.lm_head.weight is base.tok_emb.weight
    model = apply_token_rows(apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8)), NEW)
    lora = trainable_parameters(apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8)))
    assert trainable_parameters(model) == lora + len(NEW) * 64 * (1 if tied else 2)
    # step 0 equals the base
    x = ids()
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        want = model(x)
        merged = unload_token_rows(model)
        assert type(merged.tok_emb) is nn.Embedding and type(merged.lm_head) is nn.Linear
        assert (merged.lm_head.weight is merged.tok_emb.weight) == tied
        torch.testing.assert_close(merged(x), want, rtol=0, atol=1e-5)
    for name in ("tok_emb", "lm_head"):
        before, after = getattr(base, name).weight, getattr(merged, name).weight
        changed = (before != after).any(-1).nonzero().flatten().tolist()
        assert changed == sorted(NEW)  # every new row moved, no other row did


def test_bad_token_ids_and_a_mismatched_folder(pair, tmp_path):
    base, _ = pair
    with pytest.raises(InputError, match=r"ids in \[0, 97\)"):
        apply_token_rows(copy.deepcopy(base), [VOCAB])
    model = adapted(base)
    names = hf_module_names(model)
    tensors, extra = peft_token_rows(model, names)
    save_adapter(model, tmp_path, name_map=names, extra_tensors=tensors, extra_config=extra)
    other = apply_token_rows(copy.deepcopy(base), [1, 2, 3])
    with pytest.raises(InputError, match="trains token ids"):
        load_peft_folder(other, tmp_path)
