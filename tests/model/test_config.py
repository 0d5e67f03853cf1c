"""ModelConfig validates itself, presets are exact and build on the meta device without memory."""

from __future__ import annotations

import dataclasses

import pytest

from lmstack import ModelConfig, build_model
from lmstack.presets import PRESETS


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(d_model=100, n_heads=3), "d_model"),
        (dict(n_heads=8, n_kv_heads=3), "n_kv_heads"),
        (dict(norm="batchnorm"), "norm"),
        (dict(mlp="swish"), "mlp"),
        (dict(position="xpos"), "position"),
        (dict(rope_scaling="ntk"), "rope_scaling"),
        (dict(rope_scaling="yarn", rope_factor=4.0), "rope_original_max_seq_len"),
        (dict(n_layers=0), "n_layers"),
        (dict(vocab_size=-5), "vocab_size"),
        (dict(n_experts=4, n_experts_per_token=5), "n_experts_per_token"),
        (dict(dropout=1.5), "dropout"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(eos_id=10**6), "eos_id"),
        (dict(norm_placement="sandwich"), "norm_placement"),
    ],
)
def test_bad_config_names_the_field(changes, field):
    base = dict(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64)
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}:.* — "):
        ModelConfig(**{**base, **changes})


def test_defaults_are_resolved_and_replace_revalidates():
    c = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, d_ff=128)
    assert c.n_kv_heads == 4 and c.head_dim == 16
    gqa = dataclasses.replace(c, n_kv_heads=2)
    assert gqa.kv_dim == 32
    with pytest.raises(ValueError, match="n_kv_heads"):
        dataclasses.replace(c, n_kv_heads=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.d_model = 3  # type: ignore[misc]


def test_dict_round_trip_and_unknown_fields():
    c = ModelConfig.preset("mixtral-8x7b")
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="n_layer .*did you mean n_layers"):
        ModelConfig.from_dict({"n_layer": 3})


def test_unknown_preset_lists_close_matches():
    with pytest.raises(ValueError, match="did you mean.*llama2-7b"):
        ModelConfig.preset("llama2_7b")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta_without_memory(name):
    config = ModelConfig.preset(name)
    assert config.hf_repo or name in ("tiny", "small")
    model = build_model(config, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.num_parameters() > 0


def test_published_parameter_counts():
    # The counts of the published checkpoints (the arithmetic issue lists them as references).
    expected = {
        "gpt2": 124_439_808,
        "llama2-7b": 6_738_415_616,
        "llama2-70b": 68_976_648_192,
        "llama3-8b": 8_030_261_248,
        "mistral-7b": 7_241_732_096,
        "mixtral-8x7b": 46_702_792_704,
    }
    for name, count in expected.items():
        assert build_model(ModelConfig.preset(name), device="meta").num_parameters() == count, name


def test_meta_build_allocates_nothing():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    model = build_model(ModelConfig.preset("llama3-70b"), device="meta")  # 141 GB if it were real
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert model.num_parameters() > 70e9 and grown_mib < 200


def test_replace_rederives_head_dim_only_when_asked():
    c = ModelConfig.preset("small")
    assert dataclasses.replace(c, d_model=384, n_heads=6, head_dim=None).head_dim == 64
    assert dataclasses.replace(c, d_model=384, n_heads=6).head_dim == c.head_dim  # kept, as documented
