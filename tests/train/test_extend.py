"""A resume that changes the step budget is refused (it used to train zero steps and report success);
`extend` trains the run on to a new total, records it, and re-plans only the cosine tail."""

from __future__ import annotations

import json
import math

import pytest

from lmstack.cli import main
from lmstack.errors import InputError
from lmstack.train import TrainHooks, train
from lmstack.train.checkpoint import read_trainer_state
from lmstack.train.metrics import read_metrics
from lmstack.train.schedule import lr_at


class Crash(Exception):
    pass


def crash_at(step: int) -> TrainHooks:
    def hook(s: int, record: dict) -> None:
        if s == step:
            raise Crash(f"step {s}")

    return TrainHooks(on_step_end=hook)


def test_changed_budget_on_resume_is_refused(make_config, tmp_path, capsys):
    config = make_config(tmp_path / "run", max_steps=8)
    train(config)
    with pytest.raises(InputError, match=r"started with max_steps=8, not max_steps=12 — .*pass --extend"):
        train(config.replace(resume=True, max_steps=12))
    with pytest.raises(InputError, match=r"started with max_steps=8, not max_steps=4"):
        train(config.replace(resume=True, max_steps=4))
    # the command line: one line, exit 2, the run untouched
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "12", "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lmstack: error:") and "--extend" in err and err.count("\n") == 1
    assert max(r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")) == 8
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["max_steps"] == 8


def test_extend_trains_on_with_a_replanned_cosine_tail(make_config, tmp_path, capsys):
    """A run planned for 8 steps, killed after step 6 (last checkpoint: step 4), extended to 12 from the
    command line: steps 5..12 follow warmup-unchanged + a cosine from step 4's rate to the floor at 12,
    and metrics.jsonl reads as one run from step 0 to 12."""
    config = make_config(tmp_path / "run", max_steps=8)
    with pytest.raises(Crash):
        train(config, hooks=crash_at(6))
    before = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")}

    args = ["train", "--out", str(tmp_path / "run"), "--resume", "--extend", "--max-steps", "12", "--quiet"]
    assert main(args) == 0
    assert "trained 12 steps" in capsys.readouterr().out

    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(13))
    for step in range(0, 5):  # the steps before the checkpoint are kept as they were
        assert records[step] == before[step]
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    lr4 = lr_at(4, peak_lr=peak, min_lr=floor, warmup_steps=3, total_steps=8)
    for r in records[5:]:
        cosine = floor + (lr4 - floor) * 0.5 * (1 + math.cos(math.pi * (r["step"] - 4) / (12 - 4)))
        assert r["lr"] == pytest.approx(cosine, rel=1e-12), r["step"]
    assert records[-1]["lr"] == pytest.approx(floor)
    assert records[5]["lr"] < lr4  # no jump: the tail starts from where the curve stood
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["max_steps"] == 12  # the new total is recorded in the run
    state, _ = read_trainer_state(tmp_path / "run" / "checkpoints" / "step_12")
    assert state["schedule"]["total_steps"] == 12 and state["schedule"]["decay_start"] == 4
    # the extended run now resumes with its new total and no --extend (and trains no further)
    again = train(config.replace(resume=True, max_steps=12))
    assert again.step == 12
    with pytest.raises(InputError, match="already at step 12"):
        train(config.replace(resume=True, extend=True, max_steps=12))


def test_extend_needs_resume_and_a_step_total(make_config, tmp_path):
    with pytest.raises(InputError, match="extend: only applies to a resumed run"):
        make_config(tmp_path / "run", extend=True)
    with pytest.raises(InputError, match="extend: needs the new total as max_steps"):
        make_config(tmp_path / "run", resume=True, extend=True, max_steps=None, time_budget=1.0)


def test_schedule_extended_keeps_warmup_and_old_dicts_load():
    from lmstack.train.schedule import Schedule

    plan = Schedule(1.0, 0.1, warmup_steps=10, total_steps=20)
    during_warmup = plan.extended(5, 40)  # warmup unchanged, the cosine spans 10..40 from the peak
    assert [during_warmup.lr(s) for s in (5, 10)] == [0.5, 1.0]
    assert during_warmup.lr(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    after = plan.extended(15, 30)
    assert after.lr(15) == plan.lr(15) and after.lr(30) == pytest.approx(0.1)
    assert [after.lr(s) for s in (1, 10)] == [plan.lr(1), plan.lr(10)]
    old = {"peak_lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "total_steps": 20}  # before extensions existed
    assert Schedule.from_dict(old) == plan and Schedule.from_dict(after.to_dict()) == after
