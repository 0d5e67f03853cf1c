"""Logit parity with `transformers` for every family: load theirs, save ours, load back in theirs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import lmstack
from lmstack.config import FAMILIES
from lmstack.interop.hf import from_pretrained, save_pretrained

ATOL = 1e-4


def ours_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask)


def assert_close_on(out, ref, mask=None):
    if mask is not None:  # padding positions are meaningless on both sides
        out, ref = out[mask.bool()], ref[mask.bool()]
    assert ref.abs().max() > 1.0, "reference logits too small for a sharp comparison"
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_save_parity(family, tmp_path, hf):
    case = hf.make_case(family, tmp_path / "hf")
    model = lmstack.from_pretrained(case.folder)
    assert model.config.family == family
    assert model.num_parameters() == case.model.num_parameters()

    ids = hf.batch()
    ref = hf.logits(case.model, ids)
    assert ref.shape == (2, hf.SEQ_LEN, case.model.config.vocab_size)
    assert_close_on(ours_logits(model, ids), ref)
    padded, mask = hf.left_padded()
    ref_padded = hf.logits(case.model, padded, mask)
    assert_close_on(ours_logits(model, padded, mask), ref_padded, mask)

    lmstack.save_pretrained(model, tmp_path / "ours")
    back = hf.transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(case.model)
    assert_close_on(hf.logits(back, ids), ref)
    assert_close_on(hf.logits(back, padded, mask), ref_padded, mask)
    # ... and ours reloads it exactly (through the lmstack block)
    again = lmstack.from_pretrained(tmp_path / "ours")
    assert again.config == model.config
    assert torch.equal(ours_logits(again, ids), ours_logits(model, ids))


def test_sliding_window_is_exercised(tmp_path, hf):
    """Mistral's window (16) is shorter than the sequence: ignoring it would change the logits."""
    case = hf.make_case("mistral", tmp_path)
    model = from_pretrained(case.folder)
    assert model.config.sliding_window == 16 < hf.SEQ_LEN
    full = lmstack.build_model(dataclasses.replace(model.config, sliding_window=None))
    full.load_state_dict(model.state_dict())
    ids = hf.batch()
    assert (ours_logits(full.eval(), ids) - hf.logits(case.model, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("padded", [False, True])
def test_mixtral_aux_loss_matches(tmp_path, padded, hf):
    case = hf.make_case("mixtral", tmp_path)
    model = from_pretrained(case.folder)
    ids, mask = hf.left_padded() if padded else (hf.batch(), None)
    kwargs = (
        {} if mask is None else dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    )
    with torch.no_grad():
        ref = case.model(ids, output_router_logits=True, **kwargs)
        ours_logits(model, ids, mask)
    assert ref.aux_loss is not None and model.aux_loss is not None
    torch.testing.assert_close(model.aux_loss, ref.aux_loss.float(), atol=1e-5, rtol=1e-5)


# ---- RoPE scaling: sequences longer than the original context ----------------------------------
ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn-mscale": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.8,
        "mscale_all_dim": 0.5, "beta_fast": 16.0, "beta_slow": 2.0,
    },
    "llama3": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}  # fmt: skip


@pytest.mark.parametrize("kind", ROPE_SCALINGS)
def test_rope_scaling_parity(kind, tmp_path, hf):
    params = dict(ROPE_SCALINGS[kind], rope_theta=500.0)  # a small base so 48 tokens span many periods
    # the original context is 32 tokens: max_position_embeddings for linear and dynamic NTK (which
    # grows the base past it), original_max_position_embeddings for YaRN and Llama 3
    max_pos = 32 if kind in ("linear", "dynamic") else 128
    case = hf.make_case(
        "llama", tmp_path / "hf", dict(rope_parameters=params, max_position_embeddings=max_pos)
    )
    model = from_pretrained(case.folder)
    assert hf.SEQ_LEN > (model.config.rope_original_max_seq_len or max_pos) == 32
    assert model.config.rope_scaling == kind.split("-")[0]
    ids = hf.batch()
    ref = hf.logits(case.model, ids)
    assert_close_on(ours_logits(model, ids), ref)
    plain = hf.build(
        "llama",
        dict(max_position_embeddings=max_pos, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    )
    plain.load_state_dict(case.model.state_dict())
    assert (hf.logits(plain, ids) - ref).abs().max() > 1e-3, "the scaling must matter at this length"

    save_pretrained(model, tmp_path / "ours")
    back = hf.transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert_close_on(hf.logits(back, ids), ref)


# ---- layouts and folder formats ----------------------------------------------------------------
def test_sharded_both_ways(tmp_path, hf):
    case = hf.make_case("llama", tmp_path / "hf")
    case.model.save_pretrained(tmp_path / "hf_sharded", max_shard_size="100KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").is_file()
    model = from_pretrained(tmp_path / "hf_sharded")
    ids = hf.batch()
    ref = hf.logits(case.model, ids)
    assert_close_on(ours_logits(model, ids), ref)

    save_pretrained(model, tmp_path / "ours", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "ours" / "model.safetensors").exists()
    back = hf.transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert_close_on(hf.logits(back, ids), ref)
    assert torch.equal(ours_logits(from_pretrained(tmp_path / "ours"), ids), ours_logits(model, ids))


def test_mixtral_fused_expert_layout(tmp_path, hf):
    """transformers 5 keeps experts fused in memory (experts.gate_up_proj (E, 2ff, d), experts.down_proj);
    its save_pretrained writes the per-expert w1/w2/w3 layout. Both load."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    case = hf.make_case("mixtral", tmp_path / "hf")
    with safe_open(str(case.folder / "model.safetensors"), "pt") as f:
        assert any(".block_sparse_moe.experts.0.w1.weight" in k for k in f.keys())
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((case.folder / "config.json").read_text())
    state = {k: v.contiguous() for k, v in case.model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    ids = hf.batch()
    assert_close_on(ours_logits(from_pretrained(fused), ids), hf.logits(case.model, ids))


def test_gpt2_original_checkpoint_names(tmp_path, hf):
    """The original GPT-2 checkpoints name tensors without the `transformer.` prefix and carry the
    causal-mask buffers `attn.bias` / `attn.masked_bias`."""
    from safetensors.torch import load_file, save_file

    case = hf.make_case("gpt2", tmp_path / "hf")
    state = load_file(str(case.folder / "model.safetensors"))
    legacy = {k.removeprefix("transformer."): v for k, v in state.items()}
    legacy["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    legacy["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(legacy, str(case.folder / "model.safetensors"), metadata={"format": "pt"})
    ids = hf.batch()
    assert_close_on(ours_logits(from_pretrained(case.folder), ids), hf.logits(case.model, ids))


def test_dtype_from_config_and_override(tmp_path, hf):
    case = hf.make_case("qwen2", tmp_path / "hf")
    case.model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert {p.dtype for p in from_pretrained(tmp_path / "bf16", dtype=torch.float32).parameters()} == {
        torch.float32
    }
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("dtype", None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert {p.dtype for p in from_pretrained(tmp_path / "hf").parameters()} == {torch.float32}
    assert from_pretrained(tmp_path / "hf", attn_impl="flash").attn_impl == "flash"


def test_save_writes_the_folder_convention(tmp_path):
    class StubTokenizer:  # the tokenizer area's interface: save(folder) and eos_id
        eos_id = 5

        def save(self, folder):
            (folder / "lmstack_tokenizer.json").write_text("{}")

    config = dataclasses.replace(lmstack.ModelConfig.preset("tiny"), vocab_size=300, n_layers=1)
    model = lmstack.build_model(config, seed=0)
    out = tmp_path / "ckpt"
    save_pretrained(model, out, tokenizer=StubTokenizer())
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "model.safetensors", "generation_config.json", "lmstack_tokenizer.json"}
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 5
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and hf_config["lmstack"]["name"] == "tiny"
    assert not (tmp_path / "ckpt.tmp").exists()

    # saving again replaces the folder whole: nothing of the old one survives
    (out / "stale.txt").write_text("old")
    save_pretrained(model, out)
    assert not (out / "stale.txt").exists() and not (tmp_path / "ckpt.old").exists()


def test_configs_no_hf_class_expresses_round_trip(tmp_path):
    """ALiBi, post-norm, sinusoidal positions...: transformers can't express them, the lmstack block can."""
    config = lmstack.ModelConfig(
        vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, position="alibi", norm="layernorm",
        norm_placement="post", mlp="relu", family="llama",
    )  # fmt: skip
    model = lmstack.build_model(config, seed=0).eval()
    with pytest.warns(UserWarning, match="cannot express"):
        save_pretrained(model, tmp_path / "m")
    again = from_pretrained(tmp_path / "m")
    assert again.config == config
    ids = torch.randint(0, 97, (2, 12))
    assert torch.equal(ours_logits(again, ids), ours_logits(model, ids))
