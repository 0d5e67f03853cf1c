"""Shared fixtures for the training tests: one small prepared dataset and a tiny, fast run config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmstack.train import TrainConfig

# A two-layer model small enough that a step takes milliseconds on one CPU thread.
TINY_MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128, "max_seq_len": 64}


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~300 KB of the embedded default corpus as a JSONL file (no files from outside the repo)."""
    from lmstack.data.corpus import default_corpus

    docs, chars = [], 0
    for text in default_corpus():
        docs.append(text)
        chars += len(text)
        if chars > 300_000:
            break
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def dataset(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared dataset folder (512-id BPE) built once for the session."""
    from lmstack.data.pipeline import prepare_dataset

    out = tmp_path_factory.mktemp("dataset")
    prepare_dataset([corpus_file], out, vocab_size=512)
    return out


@pytest.fixture(scope="session")
def make_config(dataset: Path):
    """`make_config(out, **changes)`: 12 steps of a tiny model with gradient accumulation (2 × 4
    sequences), dropout on, eval and checkpoints every 4 steps, one thread, and a fixed peak FLOP/s
    so no time is spent measuring it."""

    def make(out: Path, **changes) -> TrainConfig:
        config = TrainConfig(
            preset="tiny",
            model=TINY_MODEL,
            data=(str(dataset),),
            out=str(out),
            max_steps=12,
            seq_len=32,
            batch_size=8,
            micro_batch_size=4,
            lr=3e-3,
            warmup_steps=3,
            dropout=0.1,
            eval_interval=4,
            eval_batches=2,
            checkpoint_interval=4,
            keep_checkpoints=3,
            threads=1,
            peak_flops=1e11,
            progress=False,
            sample_tokens=0,
        )
        return config.replace(**changes)

    return make


@pytest.fixture
def tiny_config(make_config, tmp_path: Path) -> TrainConfig:
    return make_config(tmp_path / "run")


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
