"""DPO: the loss, reward margin and preference accuracy equal trl's DPOTrainer on the same log-probs;
a DPO run with LoRA through the loop raises the preference accuracy and records its reference."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmstack.errors import InputError
from lmstack.finetune.data import IGNORE, read_records
from lmstack.finetune.dpo import dpo_loss, dpo_pairs, sequence_logps
from lmstack.finetune.run import FinetuneConfig, finetune
from lmstack.finetune.vocab import chat_ready_base
from lmstack.interop.folders import load_model_and_tokenizer
from lmstack.train.metrics import read_metrics


@pytest.fixture
def dpo_file(tmp_path, write_jsonl):
    rows = []
    for n in range(20):
        prompt = (
            f"Is {n} even?"
            if n % 2
            else [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Is {n} even?"}]
        )
        good, bad = ("yes", "no") if n % 2 == 0 else ("no", "yes")
        rows.append(
            {
                "prompt": prompt,
                "chosen": f"{good}, {n} is {'even' if good == 'yes' else 'odd'}.",
                "rejected": bad,
            }
        )
    return write_jsonl(tmp_path / "prefs.jsonl", rows)


def test_bad_preference_records(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(InputError, match=r"p\.jsonl:1: missing field\(s\) rejected"):
        read_records(path, kind="dpo")
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "b"}])
    with pytest.raises(InputError, match=r"q\.jsonl:1: 'chosen' and 'rejected' are the same"):
        read_records(path, kind="dpo")
    with pytest.raises(InputError, match="sft_weight=-1.0 must be >= 0"):
        FinetuneConfig(
            model=str(tmp_path), out=str(tmp_path / "o"), method="dpo", data="p.jsonl", sft_weight=-1.0
        )


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_loss_matches_trl(base_dir, dpo_file, tmp_path, sft_weight):
    """trl's `DPOTrainer._compute_loss` (sigmoid loss, reverse KL; with `sft_weight`, loss types sigmoid
    and sft weighted 1 and w: RPO) is run on a stand-in model that returns the per-token log-probs of
    our policy, with our reference's sequence log-probs precomputed; its loss, reward margin and accuracy
    must equal ours on the same batch."""
    trl = pytest.importorskip("trl")
    start = chat_ready_base(base_dir, tmp_path / "base")
    policy, tok = load_model_and_tokenizer(start)
    reference = load_model_and_tokenizer(start)[0]
    with torch.no_grad():  # a policy that differs from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    pairs, stats = dpo_pairs(tok, read_records(dpo_file, kind="dpo"), 96, "drop")
    assert stats.kept == 20
    from lmstack.finetune.data import pad_batch

    batch = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs])
    beta = 0.3
    policy_logps = sequence_logps(policy, batch)
    with torch.no_grad():
        ref_logps = sequence_logps(reference, batch)
    n = len(pairs)
    chosen_tokens = (batch["labels"][:n, 1:] != IGNORE).sum()
    ours, metrics = dpo_loss(
        policy_logps[:n], policy_logps[n:], ref_logps[:n], ref_logps[n:], beta, chosen_tokens=chosen_tokens,
        sft_weight=sft_weight,
    )  # fmt: skip

    logits = policy(batch["ids"], positions=batch["positions"], attention_mask=batch["mask"])
    targets = batch["labels"][:, 1:]
    per_token = logits[:, :-1].float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    per_token = per_token * (targets != IGNORE)

    def stand_in(**kw):
        return SimpleNamespace(
            log_probs=per_token, entropy=torch.zeros_like(per_token), mean_logits=torch.zeros_like(per_token),
            is_top1=torch.zeros_like(per_token, dtype=torch.bool),
        )  # fmt: skip

    identity = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=identity, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid", "sft"], loss_weights=[1.0, sft_weight],
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": batch["ids"], "attention_mask": batch["mask"].long(),
        "completion_mask": (batch["labels"] != IGNORE).long(),
        "ref_chosen_logps": ref_logps[:n], "ref_rejected_logps": ref_logps[n:],
    }  # fmt: skip
    theirs = trl.DPOTrainer._compute_loss(trainer, stand_in, inputs, False)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    logged = trainer._metrics["train"]
    assert float(metrics["reward_margin"]) == pytest.approx(logged["rewards/margins"][0], rel=1e-5)
    assert float(metrics["preference_accuracy"]) == pytest.approx(logged["rewards/accuracies"][0])
    assert 0 < float(metrics["preference_accuracy"]) < 1  # a sharp comparison: both outcomes occur
    ours.backward()  # gradients reach the policy only
    assert all(p.grad is None for p in reference.parameters())


def test_dpo_run_with_lora_prefers_the_chosen_replies(base_dir, dpo_file, tmp_path):
    run = FinetuneConfig(
        model=str(base_dir), out=str(tmp_path / "run"), data=str(dpo_file), method="dpo", adapter="lora",
        lora_targets="all-linear", beta=0.5, max_steps=12, batch_size=4, lr=2e-2, warmup_steps=2, seq_len=96,
        eval_interval=6, checkpoint_interval=6, threads=1, progress=False,
    )  # fmt: skip
    result = finetune(run)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[0]["val_reward_margin"] == pytest.approx(0.0, abs=1e-6)  # policy = reference at step 0
    assert records[-1]["val_preference_accuracy"] > records[0]["val_preference_accuracy"]
    assert records[-1]["val_reward_margin"] > 0.1
    assert all({"reward_margin", "preference_accuracy", "chosen_nll"} <= r.keys() for r in records[1:])
    state = json.loads((result.train.checkpoint / "trainer" / "state.json").read_text())
    ref = state["method"]["state"]["reference"]
    assert ref["path"] == str(tmp_path / "run" / "base") and len(ref["sha256"]) == 64
    assert (result.train.checkpoint / "adapter" / "adapter_config.json").is_file()
