"""`lmstack info MODEL` for a preset, a checkpoint folder, a run folder, and an unknown name."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lmstack import ModelConfig, build_model
from lmstack.cli import main
from lmstack.cli.model import parameter_breakdown
from lmstack.interop.hf import save_pretrained


def test_preset(capsys):
    assert main(["info", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "mistralai/Mixtral-8x7B-v0.1" in out and "n_experts                    8" in out
    assert "46,702,792,704" in out  # Mixtral 8x7B's published 46.7B
    assert "12,879,925,248" in out  # ... of which 12.9B active per token


def test_breakdown_matches_the_built_model():
    config = dataclasses.replace(ModelConfig.preset("gpt2"), n_layers=2)
    counts = parameter_breakdown(config)
    model = build_model(config, device="meta")
    assert (
        counts["total"]
        == model.num_parameters()
        == sum(counts[c] for c in counts if c not in ("total", "active"))
    )
    assert counts["lm_head"] == 0 and counts["embeddings"] == (50257 + 1024) * 768
    assert parameter_breakdown(ModelConfig.preset("llama2-7b"))["total"] == 6_738_415_616


def test_folder_and_run_folder(tmp_path, capsys):
    config = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=128, n_layers=1)
    save_pretrained(build_model(config, seed=0), tmp_path / "run" / "checkpoints" / "step_10")
    assert main(["info", str(tmp_path / "run" / "checkpoints" / "step_10"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"]["kind"] == "folder" and info["source"]["dtype"] == "float32"
    assert info["config"]["vocab_size"] == 128
    assert info["parameters"]["total"] == build_model(config, device="meta").num_parameters()

    (tmp_path / "run" / "latest").write_text("checkpoints/step_10\n")  # the trainer's pointer
    assert main(["info", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "step_10" in out and "tied to embeddings" in out


@pytest.mark.parametrize(
    "arg, message",
    [
        ("llama-8b", "unknown preset 'llama-8b' — did you mean llama3-8b"),
        ("./no/such", "no such file or folder"),
    ],
)
def test_unknown_model_errors_cleanly(arg, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["info", arg])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lmstack: error: ") and message in err and len(err.strip().splitlines()) == 1
