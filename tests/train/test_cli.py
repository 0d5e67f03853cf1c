"""`lmstack train`: the CI smoke run on the embedded default corpus, config files and flags, errors."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import yaml

from lmstack.cli import main
from lmstack.errors import InputError
from lmstack.train import TrainConfig
from lmstack.train.metrics import read_metrics

# The default code path (embedded corpus -> data pipeline -> BPE training -> `small` preset -> sample),
# shrunk through the config file so five steps take seconds: a 200 kB slice of the corpus, a 512-id
# vocabulary and a narrower model.
SMOKE = {
    "vocab_size": 512,
    "corpus_max_chars": 200_000,
    "model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 128},
    "seq_len": 64,
    "batch_size": 4,
    "eval_batches": 2,
    "sample_tokens": 12,
    "threads": 1,
    "peak_flops": 1e11,
}


def test_smoke_train_max_steps_5_on_default_corpus(tmp_path, capsys):
    config = tmp_path / "smoke.yaml"
    config.write_text(yaml.safe_dump(SMOKE))
    out = tmp_path / "run"
    assert main(["train", "--max-steps", "5", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "trained 5 steps" in printed
    assert "validation: loss" in printed and "perplexity" in printed and "bits per byte" in printed
    assert "sample:\n    The" in printed
    assert f"wrote {out}/" in printed
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert (out / "checkpoints" / "step_5" / "config.json").is_file()
    assert sorted(p.name for p in (out / "corpus").iterdir()) == [
        "python_docs.jsonl",
        "python_docstrings.jsonl",
    ]
    assert (out / "data" / "manifest.json").is_file() and (out / "data" / "tokenizer").is_dir()
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["preset"] == "small" and saved["max_steps"] == 5 and saved["data"] == []
    assert json.loads((out / "checkpoints" / "step_5" / "config.json").read_text())["vocab_size"] == 512


def _args(**given) -> argparse.Namespace:
    fields = dict(
        preset=None, data=None, tokenizer=None, out=None, max_steps=None, time_budget=None, resume=False, seed=None,
        config=None, device=None, threads=None, precision=None, quiet=False, init_from=None, extend=False,
    )  # fmt: skip
    return argparse.Namespace(**{**fields, **given})


def test_config_file_then_flags(tmp_path):
    from lmstack.cli.train import build_config

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "tiny", "lr": 0.002, "max_steps": 100, "model": {"n_layers": 2}}))
    config = build_config(_args(config=str(path), max_steps=7, seed=3, data=["a.txt", "b/"]))
    assert config == TrainConfig(
        preset="tiny", lr=0.002, max_steps=7, seed=3, model={"n_layers": 2}, data=("a.txt", "b/")
    )
    assert config.effective_time_budget is None
    assert TrainConfig().effective_time_budget == 10.0  # no limit given: the 10-minute default


def test_resume_reads_the_saved_config_and_flags_override(tmp_path):
    from lmstack.cli.train import build_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(TrainConfig(preset="tiny", lr=0.002, max_steps=50).to_json())
    config = build_config(_args(resume=True, out=str(run), max_steps=80))
    assert config.preset == "tiny" and config.lr == 0.002 and config.max_steps == 80 and config.resume


@pytest.mark.parametrize(
    "content, message",
    [
        ({"lr": -1}, "TrainConfig.lr: must be > 0"),
        ({"warmup_step": 10}, "unknown training config key(s): warmup_step (did you mean warmup_steps?)"),
        ({"model": {"n_layer": 2}}, "unknown ModelConfig field(s) n_layer (did you mean n_layers?)"),
        ({"precision": "fp8"}, "unknown precision 'fp8'"),
        ({"batch_size": 4, "micro_batch_size": 8}, "larger than the global batch_size"),
    ],
)
def test_bad_config_values_name_the_field(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(InputError) as info:
        TrainConfig.load(path)
    assert message in str(info.value) and " — " in str(info.value)


def test_unparsable_config_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="cannot parse config file"):
        TrainConfig.load(path)


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(empty), "--out", str(tmp_path / "run"), "--max-steps", "2", "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lmstack: error: no text found") and err.count("\n") == 1


def test_resume_without_a_run_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["train", "--resume"])
    assert "no run to resume in runs/" in capsys.readouterr().err
    assert not Path("runs").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),  # no --data: the default corpus path would run first
        (["--max-steps", "0"], "TrainConfig.max_steps: must be a positive integer"),
        (["--time-budget", "-1"], "TrainConfig.time_budget"),
        (["--data", "missing.txt"], "data path not found: missing.txt"),
        (["--tokenizer", "no_tokenizer"], "tokenizer folder not found"),
        (["--init-from", "no_such_run"], "init_from 'no_such_run' is not a folder"),
        (["--init-from", "."], "neither a checkpoint folder"),
        (["--extend", "--max-steps", "5"], "extend: only applies to a resumed run"),
        (["--precision", "fp16", "--device", "cpu"], "fp16 training needs a CUDA GPU"),
        (["--config", "c.yaml"], "seq_len 128 is longer than the model's context"),
        (["--config", "bad_model.yaml"], "d_model"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    """Every argument and config field is checked before the corpus, the data pipeline or the run
    folder is touched: no runs/ folder (and no data/ or corpus/ in it) is created."""
    monkeypatch.chdir(tmp_path)
    Path("c.yaml").write_text(yaml.safe_dump({"model": {"max_seq_len": 64}, "seq_len": 128}))
    Path("bad_model.yaml").write_text(yaml.safe_dump({"model": {"d_model": 100, "n_heads": 3}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *args, "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lmstack: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_model.yaml", "c.yaml"]  # no runs/ at all
