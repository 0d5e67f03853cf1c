"""Broken checkpoint folders raise an InputError naming the file or tensor, never a bare traceback."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmstack import InputError, ModelConfig, build_model
from lmstack.interop.hf import from_pretrained, save_pretrained


@pytest.fixture
def folder(tmp_path):
    config = dataclasses.replace(
        ModelConfig.preset("tiny"), vocab_size=128, n_layers=2, d_model=32, n_heads=4, d_ff=64
    )
    save_pretrained(build_model(config, seed=0), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_valid_folder_loads(folder):
    assert from_pretrained(folder).config.vocab_size == 128


def test_missing_folder_and_config(folder, tmp_path):
    with pytest.raises(InputError, match="no such checkpoint folder"):
        from_pretrained(tmp_path / "nowhere")
    (folder / "config.json").unlink()
    with pytest.raises(InputError, match=r"config\.json: missing"):
        from_pretrained(folder)


def test_missing_weights(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"no \*\.safetensors weights"):
        from_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(InputError, match="pickled .bin/.pt weights are not read"):
        from_pretrained(folder)


def test_truncated_safetensors(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"model\.safetensors: not a readable safetensors file.*truncated"):
        from_pretrained(folder)


def test_wrong_shape_names_the_tensor(folder):
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(7, 32)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        InputError, match=r"tensor model\.layers\.1\.self_attn\.k_proj\.weight has shape \(7, 32\)"
    ):
        from_pretrained(folder)


def test_missing_and_unexpected_tensors(folder):
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"q_proj\.bias have no place"):
        from_pretrained(folder)
    del state["model.layers.0.self_attn.q_proj.bias"], state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"lacks tensor\(s\) model\.layers\.1\.mlp\.down_proj\.weight"):
        from_pretrained(folder)


def test_missing_shard(folder, tmp_path):
    model = from_pretrained(folder)
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=20_000)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(
        InputError, match=rf"{shards[-1].name}: shard listed in model\.safetensors\.index\.json is missing"
    ):
        from_pretrained(tmp_path / "sharded")


def test_unsupported_architecture(folder):
    data = json.loads((folder / "config.json").read_text())
    data.pop("lmstack")
    data["architectures"] = ["T5ForConditionalGeneration"]
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(
        InputError, match=r"config\.json: unsupported architecture.*supported: GPT2LMHeadModel"
    ):
        from_pretrained(folder)


def test_failed_save_leaves_previous_checkpoint(folder, monkeypatch):
    import lmstack.interop.hf as hf

    before = (folder / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(from_pretrained(folder), folder)
    assert (folder / "model.safetensors").read_bytes() == before
    assert not folder.with_name(folder.name + ".tmp").exists()
