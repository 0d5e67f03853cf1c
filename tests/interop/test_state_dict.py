"""The HF-named state dict both ways (`hf_state_dict`, `load_hf_state_dict`), against `transformers`' own."""

from __future__ import annotations

import pytest
import torch

import lmstack
from lmstack.config import FAMILIES
from lmstack.errors import InputError
from lmstack.interop.hf import hf_state_dict, load_hf_state_dict


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_state_dict_is_transformers_state_dict(family, tmp_path, hf):
    """Every fused HF tensor (GPT-2's c_attn, Phi-3's qkv_proj and gate_up_proj) is rebuilt exactly."""
    case = hf.make_case(family, tmp_path)
    model = lmstack.from_pretrained(case.folder)
    theirs = {
        n: t for n, t in case.model.state_dict().items() if not n.endswith((".attn.bias", ".masked_bias"))
    }
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.tok_emb.weight
        del theirs["lm_head.weight"]  # the embedding, stored once
    ours = hf_state_dict(model)
    if family == "mixtral":  # transformers holds experts fused in memory; we write the per-expert layout
        theirs = {n: t for n, t in theirs.items() if ".mlp." not in n}
        ours = {n: t for n, t in ours.items() if ".block_sparse_moe." not in n}
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_load_hf_state_dict_gives_transformers_logits(family, tmp_path, hf):
    case = hf.make_case(family, tmp_path)
    config = lmstack.from_pretrained(case.folder).config
    model = lmstack.build_model(config).eval()
    load_hf_state_dict(model, case.model.state_dict())
    if config.tie_embeddings:
        assert model.lm_head.weight is model.tok_emb.weight
    ids = hf.batch()
    ref = hf.logits(case.model, ids)
    assert ref.abs().max() > 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, atol=1e-4, rtol=0)
    # meta-built, tensors adopted
    meta = lmstack.build_model(config, device="meta")
    load_hf_state_dict(meta, {n: t.clone() for n, t in case.model.state_dict().items()}, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(meta.eval()(ids), ref, atol=1e-4, rtol=0)


def test_load_hf_state_dict_refuses_missing_extra_and_misshapen(tmp_path, hf):
    case = hf.make_case("phi3", tmp_path)
    model = lmstack.from_pretrained(case.folder)
    tensors = hf_state_dict(model)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    with pytest.raises(InputError, match="lacks tensor"):
        load_hf_state_dict(model, {n: t for n, t in tensors.items() if n != name})
    with pytest.raises(InputError, match="no place"):
        load_hf_state_dict(model, {**tensors, "model.layers.0.self_attn.q_proj.weight": tensors[name]})
    with pytest.raises(InputError, match="has shape"):
        load_hf_state_dict(model, {**tensors, name: tensors[name][:-1]})
