"""The `tiny` preset learns Shakespeare: within a 60-second budget the validation loss falls to at most
0.8× the untrained model's (≈ ln vocab). Raw text in, so the pipeline and tokenizer training run too."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmstack.train import TrainConfig, train
from lmstack.train.metrics import read_metrics

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.mark.slow
def test_tiny_preset_learns_tinyshakespeare_in_60_seconds(tmp_path):
    text = SHARED_DATA / "tinyshakespeare.txt"
    if not text.is_file():
        pytest.skip(f"{text} is not available")
    config = TrainConfig(
        preset="tiny",
        data=(str(text),),
        vocab_size=512,
        out=str(tmp_path / "run"),
        time_budget=1.0,  # minutes, data preparation included
        max_steps=150,  # on an idle 2-core machine this ends first (~20 s); 0.8x is reached near step 100
        seq_len=64,
        batch_size=16,
        lr=6e-3,
        warmup_steps=5,
        eval_interval=50,  # evaluations cost time the budget counts
        eval_batches=4,
        checkpoint_interval=1000,
        threads=2,
        progress=False,
        sample_tokens=0,
    )
    result = train(config)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["elapsed_s"] <= 60 * 1.05 + 5 + 10  # budget, overrun grace, the final full eval
    assert result.initial_val_loss > 6.0  # ≈ ln 512 = 6.24: untrained
    assert result.val_loss <= 0.8 * result.initial_val_loss, (
        result.step,
        result.val_loss,
        result.initial_val_loss,
    )
