"""DDP: `torchrun --nproc_per_node 2` (gloo, one thread each, dropout 0) with the same global batch
gives the loss curve of one process.

Tolerance: each process averages its own micro-batch and DDP averages the two gradients, where one
process accumulates two halves; the sums differ only in floating-point order (~1e-7 relative per
step), which the optimizer carries forward. Over 8 steps we allow 1e-4 relative on every train and
validation loss and 1e-4 absolute on every final weight; a wrong batch split or a missing gradient
average would be off by far more (the loss falls by ~0.5 over these steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lmstack.train import train
from lmstack.train.metrics import read_metrics


def torchrun_lmstack(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 --module lmstack ARGS`, one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["--module", "lmstack", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_processes_match_one(make_config, tmp_path):
    common = dict(dropout=0.0, max_steps=8, checkpoint_interval=100, eval_interval=4)
    single = train(make_config(tmp_path / "single", micro_batch_size=4, **common))  # 2 accumulated halves

    config = make_config(tmp_path / "ddp", micro_batch_size=4, **common)  # 1 half on each process
    path = tmp_path / "ddp.json"
    path.write_text(config.to_json())
    done = torchrun_lmstack(["train", "--config", str(path), "--quiet"], timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[:3000] + "\n...\n" + done.stderr[-4000:]

    a = read_metrics(single.run_dir / "metrics.jsonl")
    b = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(9))
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            if ra.get(key) is not None:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4), (ra["step"], key)
    assert a[-1]["train_loss"] < a[1]["train_loss"] - 0.3
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step_8" / "trainer" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    wa = load_file(str(single.run_dir / "checkpoints" / "step_8" / "model.safetensors"))
    wb = load_file(str(tmp_path / "ddp" / "checkpoints" / "step_8" / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-4, msg=name)


@pytest.mark.slow
def test_bad_input_under_torchrun_stops_every_rank_with_one_message(tmp_path):
    """Rank 0 prepares the data; its error reaches rank 1 instead of leaving it at a barrier."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = ["train", "--data", str(empty), "--out", str(tmp_path / "run"), "--max-steps", "2", "--quiet"]
    done = torchrun_lmstack(args, timeout=120)
    assert done.returncode != 0
    assert done.stderr.count("lmstack: error: no text found in the inputs") == 2, done.stderr[-2000:]
