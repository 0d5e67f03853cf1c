"""Checkpoints: a run crashed at any instant and resumed equals an uninterrupted run bit for bit (CPU,
fixed threads, dropout on); NaN stops the run keeping the last good checkpoint; a corrupt checkpoint
or a changed model config is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmstack.errors import InputError, RunError
from lmstack.train import TrainHooks, train
from lmstack.train.checkpoint import read_trainer_state
from lmstack.train.metrics import read_metrics


class Crash(Exception):
    """Stands in for a kill: raised from a hook, nothing after it runs."""


def losses(run: Path) -> list[tuple[int, float]]:
    return [
        (r["step"], r["train_loss"])
        for r in read_metrics(run / "metrics.jsonl")
        if r["train_loss"] is not None
    ]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    assert losses(a) == losses(b)  # exact float equality, every step
    va = [(r["step"], r["val_loss"]) for r in read_metrics(a / "metrics.jsonl") if "val_loss" in r]
    vb = [(r["step"], r["val_loss"]) for r in read_metrics(b / "metrics.jsonl") if "val_loss" in r]
    assert va == vb
    wa, wb = weights(a / "checkpoints" / "step_12"), weights(b / "checkpoints" / "step_12")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    oa = load_file(str(a / "checkpoints" / "step_12" / "trainer" / "optimizer.safetensors"))
    ob = load_file(str(b / "checkpoints" / "step_12" / "trainer" / "optimizer.safetensors"))
    for name in oa:
        assert torch.equal(oa[name], ob[name]), name


@pytest.fixture(scope="module")
def reference(make_config, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = train(make_config(out))
    assert result.step == 12 and result.checkpoint == out / "checkpoints" / "step_12"
    return out


def crash_at_step(step: int) -> TrainHooks:
    def hook(s: int, record: dict) -> None:
        if s == step:
            raise Crash(f"step {s}")

    return TrainHooks(on_step_end=hook)


def crash_in_checkpoint(step: int, stage: str) -> TrainHooks:
    def hook(s: str, path: Path) -> None:
        if s == stage and path.name.startswith(f"step_{step}"):
            raise Crash(f"{stage} {path}")

    return TrainHooks(on_checkpoint=hook)


@pytest.mark.parametrize(
    "hooks",
    [
        pytest.param(crash_at_step(7), id="after-step-7"),
        pytest.param(crash_in_checkpoint(8, "written"), id="checkpoint-written-not-renamed"),
        pytest.param(crash_in_checkpoint(8, "renamed"), id="checkpoint-renamed-pointer-not-moved"),
    ],
)
def test_crash_and_resume_is_bit_identical(reference, tiny_config, tmp_path, hooks):
    config = tiny_config.replace(out=str(tmp_path / "crashed"))
    with pytest.raises(Crash):
        train(config, hooks=hooks)
    # the metrics file may hold steps past the last checkpoint; resume cuts it back
    result = train(config.replace(resume=True))
    assert result.step == 12
    assert_same_run(reference, tmp_path / "crashed")
    assert not list((tmp_path / "crashed" / "checkpoints").glob("*.tmp"))


def test_crash_before_first_checkpoint_restarts_cleanly(reference, tiny_config, tmp_path):
    config = tiny_config.replace(out=str(tmp_path / "early"))
    with pytest.raises(Crash):
        train(config, hooks=crash_at_step(2))
    train(config.replace(resume=True))
    assert_same_run(reference, tmp_path / "early")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
    def poison(step: int, model: torch.nn.Module) -> None:
        if step == 6:
            with torch.no_grad():
                model.blocks[0].mlp.up.weight[0, 0] = float("nan")

    run = tmp_path / "run"
    with pytest.raises(RunError, match=r"NaN at step 6.*step_4"):
        train(tiny_config.replace(out=str(run)), hooks=TrainHooks(on_step_start=poison))
    assert (run / "latest").read_text().strip() == "checkpoints/step_4"
    state, _ = read_trainer_state(run / "checkpoints" / "step_4")  # intact: hashes verify
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in weights(run / "checkpoints" / "step_4").values())
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 5


@pytest.fixture
def stopped_run(tiny_config, tmp_path) -> Path:
    """A run crashed after its step-4 checkpoint."""
    with pytest.raises(Crash):
        train(tiny_config, hooks=crash_at_step(5))
    return Path(tiny_config.out)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("flip", "does not match its recorded SHA-256"),
        ("truncate-optimizer", "optimizer.safetensors does not match"),
        ("garble-state", "state.json is unreadable"),
        ("delete-weights", "model.safetensors is missing"),
        ("bad-pointer", "not a checkpoint folder"),
    ],
)
def test_corrupt_checkpoint_on_resume_is_a_clear_error(stopped_run, tiny_config, damage, message):
    ckpt = stopped_run / "checkpoints" / "step_4"
    if damage == "flip":
        data = bytearray((ckpt / "model.safetensors").read_bytes())
        data[-3] ^= 0xFF
        (ckpt / "model.safetensors").write_bytes(bytes(data))
    elif damage == "truncate-optimizer":
        data = (ckpt / "trainer" / "optimizer.safetensors").read_bytes()
        (ckpt / "trainer" / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garble-state":
        (ckpt / "trainer" / "state.json").write_text('{"step": 4,')
    elif damage == "delete-weights":
        (ckpt / "model.safetensors").unlink()
    else:
        (stopped_run / "latest").write_text("checkpoints/step_99\n")
    with pytest.raises(InputError, match=message):
        train(tiny_config.replace(resume=True))


def test_changed_model_config_on_resume_is_an_error(stopped_run, tiny_config):
    changed = tiny_config.replace(resume=True, model={**tiny_config.model, "d_ff": 192})
    with pytest.raises(InputError, match=r"model config differs.*d_ff"):
        train(changed)


def test_fresh_run_into_an_existing_run_folder_is_refused(stopped_run, tiny_config):
    with pytest.raises(InputError, match="already holds a run — pass --resume"):
        train(tiny_config)


def test_trainer_state_is_json_and_safetensors(stopped_run):
    ckpt = stopped_run / "checkpoints" / "step_4"
    names = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert "trainer/state.json" in names and "trainer/optimizer.safetensors" in names
    assert not [n for n in names if n.endswith((".pt", ".pkl", ".bin"))]
    state = json.loads((ckpt / "trainer" / "state.json").read_text())
    assert state["step"] == 4 and state["method"]["state"]["data_position"]["batches_served"] == 4 * 2
    assert {"schedule", "rng", "model_config_hash", "optimizer", "files"} <= state.keys()
    # the checkpoint is a Hugging Face folder: transformers loads it as a Llama
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(ckpt)).__name__ == "LlamaForCausalLM"
    # and it is meant to be sampled: transformers and `generation_defaults` read the same settings
    from transformers import GenerationConfig

    from lmstack.interop.folders import generation_defaults

    gen = GenerationConfig.from_pretrained(ckpt)
    assert gen.do_sample and (gen.temperature, gen.top_p) == (0.7, 0.9)
    assert generation_defaults(ckpt) == {"temperature": 0.7, "top_p": 0.9}
