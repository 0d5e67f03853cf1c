"""`init_from`: training starts from trained weights — a run folder, a checkpoint folder, or a folder
`transformers` wrote — with the config and tokenizer taken from it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lmstack.errors import InputError
from lmstack.train import TrainHooks, train
from lmstack.train.metrics import read_metrics


@pytest.fixture(scope="module")
def pretrained(make_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrained") / "run"
    train(make_config(out, max_steps=4))
    return out


def hf_folder(checkpoint: Path, out: Path) -> Path:
    """The checkpoint re-saved by `transformers` (its own config.json and weight names), with the
    Hugging Face tokenizer files only."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(checkpoint).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / name, out / name)
    return out


def first_weights(config) -> dict[str, torch.Tensor]:
    """The model's weights as step 1 starts (captured from a hook, then the run stops)."""
    seen: dict[str, torch.Tensor] = {}

    class Stop(Exception):
        pass

    def hook(step: int, model: torch.nn.Module) -> None:
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        raise Stop

    with pytest.raises(Stop):
        train(config, hooks=TrainHooks(on_step_start=hook))
    return seen


def test_init_from_run_checkpoint_and_hf_folders_start_from_the_same_weights(
    make_config, pretrained, tmp_path
):
    from lmstack.interop.folders import load_model_and_tokenizer

    ckpt = pretrained / "checkpoints" / "step_4"
    expected = load_model_and_tokenizer(ckpt)[0].state_dict()
    sources = {"run": pretrained, "checkpoint": ckpt, "hf": hf_folder(ckpt, tmp_path / "hf")}
    for name, source in sources.items():
        config = make_config(tmp_path / name, init_from=str(source), model={}, max_steps=2)
        weights = first_weights(config)
        assert weights.keys() == expected.keys(), name
        for key in expected:
            assert torch.equal(weights[key], expected[key]), (name, key)
    # a full run from it: step 0 scores the loaded model, and it keeps learning
    result = train(make_config(tmp_path / "full", init_from=str(pretrained), model={}, max_steps=4))
    records = read_metrics(result.run_dir / "metrics.jsonl")
    fresh = read_metrics(pretrained / "metrics.jsonl")
    assert records[0]["val_loss"] < fresh[0]["val_loss"] - 0.1  # not an untrained model
    assert result.model_config.vocab_size == 512 and result.step == 4


def test_init_from_raw_text_uses_the_checkpoints_tokenizer(make_config, pretrained, corpus_file, tmp_path):
    from lmstack.tokenizer import Tokenizer

    config = make_config(
        tmp_path / "raw", init_from=str(pretrained), model={}, data=(str(corpus_file),), max_steps=1
    )
    result = train(config)
    used = Tokenizer.load(result.run_dir / "data" / "tokenizer")
    assert used.content_hash == Tokenizer.load(pretrained / "checkpoints" / "step_4").content_hash


def test_init_from_refuses_architecture_overrides(make_config, pretrained, tmp_path):
    with pytest.raises(InputError, match="init_from takes it from the checkpoint"):
        make_config(tmp_path / "run", init_from=str(pretrained))  # the fixture's `model` section
