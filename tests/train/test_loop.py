"""The training loop: what a run writes, gradient accumulation, MoE aux loss, label smoothing, time
budgets, and bad input as clear errors."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from lmstack.errors import InputError
from lmstack.train import TrainConfig, train
from lmstack.train.checkpoint import read_trainer_state
from lmstack.train.metrics import read_metrics
from lmstack.train.optim import build_optimizer
from lmstack.train.step import causal_lm_loss, train_step


def test_run_folder_layout_and_metrics(tiny_config):
    result = train(tiny_config.replace(keep_checkpoints=2))
    run = result.run_dir
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints",
        "latest",
        "loss.png",
        "lr.png",
        "metrics.jsonl",
        "train_config.json",
    ]  # fmt: skip (a prepared dataset was given, so no data/ folder)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_12",
        "step_8",
    ]  # keep_checkpoints=2
    assert (run / "latest").read_text().strip() == "checkpoints/step_12"
    assert TrainConfig.from_dict(json.loads((run / "train_config.json").read_text())) == tiny_config.replace(
        keep_checkpoints=2
    )
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(13))
    for r in records[1:]:
        assert {"step", "train_loss", "lr", "tokens_per_s", "mfu", "grad_norm"} <= r.keys()
        assert math.isfinite(r["train_loss"]) and r["tokens_per_s"] > 0
    evaluated = [r["step"] for r in records if "val_loss" in r]
    assert evaluated == [0, 4, 8, 12]
    # bits per byte from the formula: val_loss · val_tokens / (ln 2 · val_bytes)
    from lmstack.data.pipeline import load_dataset_info

    info = load_dataset_info(tiny_config.data[0])
    last = records[-1]
    assert last["val_bpb"] == pytest.approx(
        last["val_loss"] * info.val_tokens / (math.log(2) * info.val_text_bytes)
    )
    assert last["val_ppl"] == pytest.approx(math.exp(last["val_loss"]))
    assert result.val_loss == last["val_loss"] and result.initial_val_loss == records[0]["val_loss"]
    # warmup then cosine: lr rises for 3 steps, then falls to lr · min_lr_ratio at the last step
    lrs = [r["lr"] for r in records[1:]]
    assert lrs[:3] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert lrs[-1] == pytest.approx(3e-4) and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_gradient_accumulation_matches_one_big_batch(make_config, tmp_path):
    """2 micro-batches of 4 give the same steps as one batch of 8 (up to float summation order)."""
    kw = dict(dropout=0.0, max_steps=6, checkpoint_interval=100, eval_interval=100)
    a = train(make_config(tmp_path / "accum", micro_batch_size=4, **kw))
    b = train(make_config(tmp_path / "whole", micro_batch_size=8, **kw))
    la = [r["train_loss"] for r in read_metrics(a.run_dir / "metrics.jsonl")[1:]]
    lb = [r["train_loss"] for r in read_metrics(b.run_dir / "metrics.jsonl")[1:]]
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-5)
    assert la[-1] < la[0]


def test_train_step_adds_moe_aux_loss_and_label_smoothing(dataset):
    """The step's objective = CE (with label smoothing) + coef · balancing loss; compare with a
    hand-written reference on the same batch."""
    from lmstack.config import ModelConfig
    from lmstack.data.loader import TokenBatches
    from lmstack.model import build_model

    config = ModelConfig(
        vocab_size=512, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32, n_experts=4,
        n_experts_per_token=2, router_aux_loss_coef=0.5,
    )  # fmt: skip
    model = build_model(config, seed=0)
    model.reset_parameters(0.2)  # sharp: logits O(1-10), routing not uniform
    reference = build_model(config, seed=0)
    reference.load_state_dict(model.state_dict())
    shard = dataset / "train.bin"
    x, y = next(TokenBatches(shard, 4, 16, seed=3))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    stats = train_step(
        model,
        TokenBatches(shard, 4, 16, seed=3),
        opt,
        loss_fn=causal_lm_loss(0.1),
        aux_loss_coef=0.5,
        grad_clip=None,
    )

    logits = reference(x)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), label_smoothing=0.1)
    (ce + 0.5 * reference.aux_loss).backward()
    assert stats.loss == pytest.approx(ce.item(), rel=1e-6)
    assert stats.aux_loss == pytest.approx(reference.aux_loss.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    norm = torch.linalg.vector_norm(torch.stack([q.grad.norm() for q in reference.parameters()]))
    assert stats.grad_norm == pytest.approx(float(norm), rel=1e-5)


@pytest.mark.filterwarnings("ignore:transformers' LlamaForCausalLM cannot express")
def test_moe_run_logs_aux_loss(make_config, tmp_path):
    moe = {"n_experts": 4, "n_experts_per_token": 2, "router_aux_loss_coef": 0.02}
    result = train(make_config(tmp_path / "moe", max_steps=3, model={**make_config(tmp_path).model, **moe}))
    records = read_metrics(result.run_dir / "metrics.jsonl")[1:]
    assert all(r["aux_loss"] > 0 for r in records)


def test_time_budget_fixes_and_stores_the_total(make_config, tmp_path):
    config = make_config(
        tmp_path / "timed", max_steps=None, time_budget=0.05, checkpoint_interval=1000, warmup_steps=3
    )
    result = train(config)
    state, _ = read_trainer_state(result.checkpoint)
    total = state["schedule"]["total_steps"]
    assert total is not None and result.step == total >= 10  # planned after max(warmup, 10) timed steps
    assert result.stop_reason == "time budget"
    lrs = [r["lr"] for r in read_metrics(result.run_dir / "metrics.jsonl")[1:]]
    if total > 10:  # (on a badly overloaded machine the plan may be "stop now")
        assert lrs[-1] == pytest.approx(3e-4)  # the cosine reached its floor exactly at the planned end
    # resuming a finished run keeps its plan and trains no further
    again = train(config.replace(resume=True))
    assert again.step == total


def test_raw_text_with_a_given_tokenizer(make_config, corpus_file, dataset, tmp_path):
    """--data raw files + --tokenizer DIR: the pipeline runs with that tokenizer; the vocabulary
    (and EOS id) of the model come from it."""
    from lmstack.tokenizer import Tokenizer

    tok = Tokenizer.load(dataset / "tokenizer")
    config = make_config(
        tmp_path / "run", data=(str(corpus_file),), tokenizer=str(dataset / "tokenizer"), max_steps=2
    )
    result = train(config)
    assert result.model_config.vocab_size == tok.vocab_size and result.model_config.eos_id == tok.eos_id
    assert Tokenizer.load(result.run_dir / "data" / "tokenizer").content_hash == tok.content_hash
    assert Tokenizer.load(result.checkpoint).content_hash == tok.content_hash  # saved with the checkpoint


def test_model_overrides_rederive_head_dim():
    """Overriding d_model and n_heads gives head_dim = d_model / n_heads, not the preset's resolved value."""
    from types import SimpleNamespace

    from lmstack.train.prepare import model_config_for

    tok = SimpleNamespace(vocab_size=1000, eos_id=999, bos_id=None)
    config = model_config_for(
        TrainConfig(preset="small", model={"d_model": 192, "n_heads": 6}, dropout=0.1), tok
    )
    assert (config.d_model, config.n_heads, config.head_dim, config.n_kv_heads) == (192, 6, 32, 2)
    assert (config.vocab_size, config.eos_id, config.bos_id, config.dropout, config.name) == (
        1000,
        999,
        None,
        0.1,
        "small",
    )
    llama = model_config_for(TrainConfig(preset="llama2-7b", model={"n_layers": 2}), tok)
    assert llama.bos_id is None and llama.head_dim == 128  # the preset's bos id belongs to its own vocabulary


# ------------------------------------------------------------------------------------- bad input


def _raw(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_empty_data_is_a_clear_error(make_config, tmp_path):
    empty = _raw(tmp_path, "empty.txt", b"")
    with pytest.raises(InputError, match="no text found in the inputs.*1 empty"):
        train(make_config(tmp_path / "run", data=(str(empty),), vocab_size=300))


def test_binary_data_is_a_clear_error(make_config, tmp_path):
    blob = _raw(tmp_path, "blob.bin", bytes(range(256)) * 64)
    with pytest.raises(InputError, match="binary"):
        train(make_config(tmp_path / "run", data=(str(blob),), vocab_size=300))


def test_corpus_smaller_than_one_batch_is_a_clear_error(make_config, tmp_path):
    text = "".join(
        f"Note {word}: the {word} boats sail on the sea when the wind is right and the tide is high.\n"
        for word in ("first", "second", "third", "fourth", "fifth", "sixth")
    )
    small = _raw(tmp_path, "small.txt", text.encode())
    with pytest.raises(InputError, match="corpus smaller than one batch"):
        train(
            make_config(
                tmp_path / "run", data=(str(small),), vocab_size=300, data_config={"val_fraction": 0.3}
            )
        )


def test_context_longer_than_the_model_is_a_clear_error(make_config, tmp_path):
    with pytest.raises(
        InputError, match=r"seq_len 128 is longer than the model's context \(max_seq_len=64\)"
    ):
        train(make_config(tmp_path / "run", seq_len=128))


def test_missing_data_path_is_a_clear_error(make_config, tmp_path):
    with pytest.raises(InputError, match="data path not found"):
        train(make_config(tmp_path / "run", data=(str(tmp_path / "nope.txt"),)))


def test_unwritable_output_folder_is_a_clear_error(make_config, tmp_path):
    blocker = _raw(tmp_path, "file", b"x")
    with pytest.raises(InputError, match="choose a writable --out|is a file"):
        train(make_config(blocker / "run"))
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(InputError, match="cannot write to the output folder"):
            train(make_config(locked / "run"))
