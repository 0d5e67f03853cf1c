"""`config_from_hf` / `config_to_hf`: both RoPE layouts, every family, the `lmstack` block."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lmstack import InputError, ModelConfig
from lmstack.interop.hf_config import config_from_hf, config_to_hf, hf_incompatibilities
from lmstack.presets import PRESETS

LLAMA_V4 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "torch_dtype": "bfloat16",
}  # fmt: skip


def v5(config: dict) -> dict:
    """The same config in the transformers 5 layout: everything RoPE inside `rope_parameters`."""
    out = {k: v for k, v in config.items() if k not in ("rope_theta", "rope_scaling")}
    scaling = dict(config.get("rope_scaling") or {})
    kind = scaling.pop("type", scaling.get("rope_type", "default"))
    out["rope_parameters"] = dict(scaling, rope_type=kind)
    if "rope_theta" in config:
        out["rope_parameters"]["rope_theta"] = config["rope_theta"]
    return out


def test_llama31_both_layouts_match_the_preset():
    for data in (LLAMA_V4, v5(LLAMA_V4)):
        config = config_from_hf(data)
        preset = ModelConfig.preset("llama3.1-8b")  # the base model, whose config lists one EOS id
        assert config == dataclasses.replace(preset, hf_repo=None, extra_eos_ids=(128008, 128009))
        assert config.eos_id == 128001  # the first of the list is the primary one
        assert config.eos_ids == (128001, 128008, 128009)  # generation stops at any of them
        assert config_to_hf(config)["eos_token_id"] == [128001, 128008, 128009]
        assert ModelConfig.from_dict(json.loads(config.to_json())) == config  # a list in JSON


@pytest.mark.parametrize(
    "scaling, expected",
    [
        ({"type": "linear", "factor": 4.0}, dict(rope_scaling="linear", rope_factor=4.0)),
        (
            {"type": "dynamic", "factor": 2.0},
            dict(rope_scaling="dynamic", rope_factor=2.0, rope_original_max_seq_len=4096, max_seq_len=8192),
        ),
        (
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 16},
            dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=1024, rope_beta_fast=16.0),
        ),
        (  # DeepSeek-style mscale: the attention factor is the ratio transformers computes
            {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 1024, "mscale": 1.0,
             "mscale_all_dim": 1.0},
            dict(rope_scaling="yarn", rope_factor=40.0, rope_original_max_seq_len=1024, rope_attention_factor=1.0),
        ),
        (  # YaRN without a factor: max_position_embeddings / original
            {"rope_type": "yarn", "original_max_position_embeddings": 1024},
            dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=1024),
        ),
        ({"rope_type": "default"}, dict(rope_scaling="none")),
    ],
)  # fmt: skip
def test_rope_scaling_v4_and_v5(scaling, expected):
    base = dict(LLAMA_V4, max_position_embeddings=4096, rope_theta=10000.0, rope_scaling=scaling)
    for data in (base, v5(base)):
        config = config_from_hf(data)
        for field, value in expected.items():
            assert getattr(config, field) == pytest.approx(value), (field, data)


def test_transformers_parses_the_same(tmp_path):
    """transformers' own reading of a v4 dict (re-serialised in v5 layout) gives the same ModelConfig."""
    transformers = pytest.importorskip("transformers")
    for scaling in (
        None,
        LLAMA_V4["rope_scaling"],
        {"type": "dynamic", "factor": 2.0},
        {"type": "yarn", "factor": 2.0},
    ):
        data = dict(LLAMA_V4, rope_scaling=scaling)
        theirs = transformers.LlamaConfig(
            **{k: v for k, v in data.items() if k not in ("architectures", "model_type")}
        )
        theirs.architectures = ["LlamaForCausalLM"]
        theirs.save_pretrained(tmp_path)
        written = json.loads((tmp_path / "config.json").read_text())
        assert "rope_parameters" in written and "rope_scaling" not in written
        assert config_from_hf(tmp_path) == config_from_hf(data)


FAMILY_V4 = {  # minimal hand-written v4 config.json of each family (keys transformers would default omitted)
    "gpt2": dict(architectures=["GPT2LMHeadModel"], n_embd=768, n_layer=12, n_head=12, vocab_size=50257),
    "mistral": dict(architectures=["MistralForCausalLM"], hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                    rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, vocab_size=32000),
    "mixtral": dict(architectures=["MixtralForCausalLM"], hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                    num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02, vocab_size=32000),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072, rope_theta=1e6,
                  vocab_size=152064, bos_token_id=151643, eos_token_id=151643, use_sliding_window=False,
                  sliding_window=131072, max_window_layers=28),
    "phi3": dict(architectures=["Phi3ForCausalLM"], hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, sliding_window=2047,
                 vocab_size=32064, bos_token_id=1, eos_token_id=32000, pad_token_id=32000, rope_scaling=None),
    "gemma": dict(architectures=["GemmaForCausalLM"], hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                  num_attention_heads=8, num_key_value_heads=1, head_dim=256, hidden_act="gelu", vocab_size=256000,
                  max_position_embeddings=8192),
}  # fmt: skip
PRESET_OF = {"gpt2": "gpt2", "mistral": "mistral-7b", "mixtral": "mixtral-8x7b", "qwen2": "qwen2-7b",
             "phi3": "phi3-mini", "gemma": "gemma-2b"}  # fmt: skip


@pytest.mark.parametrize("family", FAMILY_V4)
def test_each_family_v4_and_v5_gives_its_preset(family):
    preset = dataclasses.replace(ModelConfig.preset(PRESET_OF[family]), hf_repo=None)
    if family == "gpt2":
        preset = dataclasses.replace(preset, dropout=0.1)  # GPT-2's config default resid_pdrop
    for data in (FAMILY_V4[family], v5(FAMILY_V4[family])):
        assert config_from_hf(data) == preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_without_the_lmstack_block(name):
    preset = ModelConfig.preset(name)
    assert hf_incompatibilities(preset) == []
    data = config_to_hf(preset)
    assert config_from_hf(data) == preset  # the lmstack block
    data.pop("lmstack")
    assert config_from_hf(json.loads(json.dumps(data))) == dataclasses.replace(preset, hf_repo=None)
    assert config_from_hf(v5(data)) == dataclasses.replace(preset, hf_repo=None)


def test_transformers_reads_what_we_write(tmp_path):
    transformers = pytest.importorskip("transformers")
    for name in (
        "gpt2",
        "llama3.1-8b",
        "mistral-7b",
        "mixtral-8x7b",
        "qwen2-7b",
        "phi3-mini",
        "gemma-2b",
        "tiny",
    ):
        preset = ModelConfig.preset(name)
        (tmp_path / "config.json").write_text(json.dumps(config_to_hf(preset)))
        theirs = transformers.AutoConfig.from_pretrained(tmp_path)
        theirs.save_pretrained(tmp_path / "re")  # re-serialised by transformers 5, without our block
        data = json.loads((tmp_path / "re" / "config.json").read_text())
        data.pop("lmstack", None)
        assert config_from_hf(data) == dataclasses.replace(preset, hf_repo=None), name


def test_lmstack_block_wins(tmp_path):
    config = ModelConfig(
        vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, position="alibi", family="llama"
    )
    data = config_to_hf(config)
    assert data["lmstack"]["position"] == "alibi"
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert config_from_hf(tmp_path) == config
    assert config_from_hf(tmp_path / "config.json") == config
    assert hf_incompatibilities(config) == ["position: LlamaForCausalLM needs RoPE positions"]


def test_qwen2_sliding_window_layers():
    base = dict(FAMILY_V4["qwen2"], num_hidden_layers=4, sliding_window=1024)
    assert config_from_hf(dict(base, use_sliding_window=True, max_window_layers=0)).sliding_window == 1024
    assert config_from_hf(dict(base, use_sliding_window=False, max_window_layers=0)).sliding_window is None
    with pytest.raises(InputError, match="mixes full and sliding-window layers"):
        config_from_hf(dict(base, use_sliding_window=True, max_window_layers=2))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2"),
            "unsupported architecture.*LlamaForCausalLM",
        ),
        (dict(architectures=[], model_type="bert"), "unsupported architecture 'bert'"),
        (
            dict(rope_scaling={"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}),
            "RoPE type 'longrope'",
        ),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        (dict(hidden_act="relu"), "hidden_act 'relu'"),
        (dict(num_key_value_heads=5), "n_kv_heads"),
    ],
)
def test_unsupported_configs_raise(change, message):
    with pytest.raises(InputError, match=message):
        config_from_hf(dict(LLAMA_V4, **change))


def test_bad_config_files(tmp_path):
    with pytest.raises(InputError, match="no such config file"):
        config_from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=r"config\.json: not a readable JSON config"):
        config_from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA_V4, lmstack={"d_modle": 3})))
    with pytest.raises(InputError, match="did you mean d_model"):
        config_from_hf(tmp_path)


def test_out_of_vocabulary_token_ids_are_dropped():
    with pytest.warns(UserWarning, match="outside the vocabulary"):
        config = config_from_hf(dict(LLAMA_V4, vocab_size=1000))
    assert config.bos_id is None and config.eos_id is None


@pytest.mark.parametrize("bad", [{"hidden_size": "64"}, {"rms_norm_eps": None}, {"num_attention_heads": 0}])
def test_wrongly_typed_fields_are_input_errors(bad):
    data = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
    }  # fmt: skip
    with pytest.raises(ValueError, match="config"):
        config_from_hf({**data, **bad})
