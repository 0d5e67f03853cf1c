"""The learning-rate schedule against its formula, the time-budget estimate, and AdamW's parameter
groups and state round trip."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lmstack.config import ModelConfig
from lmstack.model import build_model
from lmstack.train.optim import build_optimizer, load_optimizer_tensors, optimizer_tensors, param_groups
from lmstack.train.schedule import Schedule, estimate_total_steps, lr_at


def test_warmup_then_cosine_to_the_floor():
    s = Schedule(peak_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert [s.lr(k) for k in (1, 5, 10)] == pytest.approx([0.1, 0.5, 1.0])
    assert s.lr(60) == pytest.approx(0.55)  # half way through the cosine: (peak + floor) / 2
    assert s.lr(110) == pytest.approx(0.1) and s.lr(500) == pytest.approx(0.1)
    k = 35  # the formula at an arbitrary point
    assert s.lr(k) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 10) / 100)))


@given(
    warmup=st.integers(0, 50),
    extra=st.integers(1, 500),
    peak=st.floats(1e-5, 1.0),
    ratio=st.floats(0.0, 1.0),
)
def test_schedule_is_bounded_and_monotone_after_warmup(warmup, extra, peak, ratio):
    total = warmup + extra
    lrs = [
        lr_at(k, peak_lr=peak, min_lr=peak * ratio, warmup_steps=warmup, total_steps=total)
        for k in range(1, total + 2)
    ]
    assert all(0 < lr <= peak * (1 + 1e-12) for lr in lrs if lr) and lrs[-1] == pytest.approx(peak * ratio)
    after = lrs[warmup:]
    assert all(a >= b - 1e-15 for a, b in zip(after, after[1:]))
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup]))


def test_unknown_total_holds_the_peak_after_warmup():
    s = Schedule(1.0, 0.1, 4, None)
    assert s.lr(2) == 0.5 and s.lr(100) == 1.0
    assert Schedule.from_dict(s.with_total(40).to_dict()) == Schedule(1.0, 0.1, 4, 40)


def test_time_budget_estimate():
    # 600 s budget, 60 s used by 10 steps; 1 s per step plus a 5 s eval every 50 steps; keep 20 s
    total = estimate_total_steps(
        budget_s=600, elapsed_s=60, step=10, step_s=1.0, eval_s=5.0, eval_interval=50, reserve_s=20
    )
    assert total == 10 + int(520 // 1.1)
    assert estimate_total_steps(budget_s=600, elapsed_s=60, step=10, step_s=1.0, max_steps=100) == 100
    assert estimate_total_steps(budget_s=30, elapsed_s=60, step=10, step_s=1.0) == 10  # already over


def _model() -> torch.nn.Module:
    config = ModelConfig(
        vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16, norm="layernorm",
        qkv_bias=True, position="learned", tie_embeddings=False,
    )  # fmt: skip
    return build_model(config, seed=0)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = _model()
    groups = {g["group"]: g for g in param_groups(model, 0.1)}
    no_decay = set(groups["no_decay"]["names"])
    decay = set(groups["decay"]["names"])
    assert no_decay == {
        n for n, _ in model.named_parameters() if "norm" in n or n.endswith("bias") or "emb" in n
    }
    assert (
        "lm_head.weight" in decay
        and "blocks.0.attn.q.weight" in decay
        and "blocks.1.mlp.down.weight" in decay
    )
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert decay | no_decay == {n for n, _ in model.named_parameters()}
    with_emb = {g["group"]: g for g in param_groups(model, 0.1, decay_embeddings=True)}
    assert "tok_emb.weight" in with_emb["decay"]["names"]


def test_decoupled_weight_decay_acts_only_on_the_decay_group():
    """With zero gradients Adam's update is 0, so one step shows the pure decay θ ← θ(1 − lr·λ)."""
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, lr=0.5, weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        decayed = not ("norm" in name or name.endswith("bias") or "emb" in name)
        expected = before[name] * (1 - 0.5 * 0.1) if decayed else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=name)


def test_optimizer_state_round_trips_exactly():
    torch.manual_seed(0)
    model = _model()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9))
    x = torch.randint(0, 64, (2, 8))
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = optimizer_tensors(opt)
    assert "blocks.0.attn.q.weight/exp_avg" in tensors and "tok_emb.weight/step" in tensors

    clone = _model()
    clone.load_state_dict(model.state_dict())
    opt2 = build_optimizer(clone, lr=5.0, weight_decay=0.0)  # hyperparameters come back from the state
    load_optimizer_tensors(opt2, tensors, meta)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9)
    for a, b in ((model, opt), (clone, opt2)):
        a(x).square().mean().backward()
        b.step()
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)
