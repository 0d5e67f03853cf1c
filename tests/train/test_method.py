"""The `Method` seam: a method with a frozen reference model (next-token CE + β·KL(policy ‖ reference))
trains through the one loop from `init_from`, is killed and resumes bit for bit; a changed reference
is refused; a method that takes its own optimizer steps is honoured; only trainable parameters reach
the optimizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lmstack.errors import InputError
from lmstack.train import Pretraining, TrainHooks, train
from lmstack.train.method import Method, MethodContext, check_frozen_model, load_frozen_model
from lmstack.train.metrics import read_metrics
from lmstack.train.step import StepStats, accumulate_gradients


class Crash(Exception):
    """Stands in for a kill: raised from a hook, nothing after it runs."""


class KLToReference(Method):
    """loss = CE(policy) + β · KL(policy ‖ reference), the KL averaged over positions; the reference is
    frozen and recorded by path + weights hash. A running sum of the KL (a tensor) and a micro-batch
    counter (JSON) stand for method state that must survive a resume."""

    name = "kl-to-reference"

    def __init__(self, reference: Path, beta: float = 0.5) -> None:
        self.reference_path, self.beta = reference, beta
        self.data = Pretraining()

    def prepare(self, model: torch.nn.Module, ctx: MethodContext) -> torch.nn.Module:
        self.reference, self.record = load_frozen_model(self.reference_path, ctx.device)
        self.kl_sum = torch.zeros((), dtype=torch.float64)
        self.micro_batches = 0
        return self.data.prepare(model, ctx)

    def batches(self, ctx: MethodContext):
        return self.data.batches(ctx)

    def loss(self, model, batch):
        x, y = batch
        logp = model(x).float().log_softmax(-1)  # (B, T, V)
        with torch.no_grad():
            logq = self.reference(x).float().log_softmax(-1)
        ce = F.nll_loss(logp.flatten(0, 1), y.flatten())
        kl = (logp.exp() * (logp - logq)).sum(-1).mean()
        self.kl_sum += kl.detach().double()
        self.micro_batches += 1
        return ce + self.beta * kl, {"ce": ce.detach(), "kl": kl.detach()}

    def log(self):
        return self.data.log()

    def state_dict(self):
        _, data_state = self.data.state_dict()
        state = {**data_state, "reference": self.record, "micro_batches": self.micro_batches}
        return {"kl_sum": self.kl_sum}, state

    def load_state_dict(self, tensors, state):
        check_frozen_model(state["reference"], self.record)
        self.data.load_state_dict({}, state)
        self.kl_sum = tensors["kl_sum"].clone()
        self.micro_batches = state["micro_batches"]


@pytest.fixture(scope="module")
def pretrained(make_config, tmp_path_factory) -> Path:
    """A short pretraining run: the policy starts from it and a copy of its checkpoint is the reference."""
    out = tmp_path_factory.mktemp("pretrained") / "run"
    train(make_config(out, max_steps=4))
    return out


@pytest.fixture
def reference(pretrained, tmp_path) -> Path:
    folder = tmp_path / "reference"
    shutil.copytree(pretrained / "checkpoints" / "step_4", folder)
    return folder


def kl_config(make_config, out: Path, pretrained: Path):
    return make_config(out, init_from=str(pretrained), model={}, dropout=0.0, lr=1e-3, eval_batches=None)


def crash_at(step: int) -> TrainHooks:
    def hook(s: int, record: dict) -> None:
        if s == step:
            raise Crash(f"step {s}")

    return TrainHooks(on_step_end=hook)


def test_kl_method_trains_and_resumes_bit_exactly(make_config, pretrained, reference, tmp_path):
    whole = kl_config(make_config, tmp_path / "whole", pretrained)
    result = train(whole, method=KLToReference(reference))
    assert result.step == 12
    records = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    # step 0: the policy is the reference checkpoint (init_from): its validation loss is the one the
    # pretraining run ended with (the same weights, the whole validation split)
    assert records[0]["val_loss"] == pytest.approx(
        read_metrics(pretrained / "metrics.jsonl")[-1]["val_loss"], rel=1e-6
    )
    steps = records[1:]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy = reference before the first update
    assert steps[-1]["kl"] > 1e-4  # ... and drifts from it
    for r in steps:  # the logged objective is CE + β·KL (micro-batch means of each)
        assert r["train_loss"] == pytest.approx(r["ce"] + 0.5 * r["kl"], rel=1e-6)  # float32 objective
        assert "epoch" in r

    crashed = kl_config(make_config, tmp_path / "crashed", pretrained)
    with pytest.raises(Crash):
        train(crashed, method=KLToReference(reference), hooks=crash_at(7))
    train(crashed.replace(resume=True), method=KLToReference(reference))

    a, b = (
        read_metrics(tmp_path / "whole" / "metrics.jsonl"),
        read_metrics(tmp_path / "crashed" / "metrics.jsonl"),
    )
    keys = ("step", "train_loss", "ce", "kl", "val_loss")
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]  # exact
    ca, cb = tmp_path / "whole" / "checkpoints" / "step_12", tmp_path / "crashed" / "checkpoints" / "step_12"
    wa, wb = load_file(str(ca / "model.safetensors")), load_file(str(cb / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (
        load_file(str(ca / "trainer" / "method.safetensors")),
        load_file(str(cb / "trainer" / "method.safetensors")),
    )
    assert torch.equal(ma["kl_sum"], mb["kl_sum"]) and ma["kl_sum"] > 0
    state = json.loads((cb / "trainer" / "state.json").read_text())
    assert state["method"]["name"] == "kl-to-reference"
    assert state["method"]["state"]["micro_batches"] == 12 * 2  # 2 micro-batches a step, restored on resume
    assert state["method"]["state"]["reference"]["path"] == str(reference)
    # the reference is recorded, not copied: the checkpoint holds one model's weights
    assert wa.keys() == load_file(str(reference / "model.safetensors")).keys()


def test_resume_with_a_changed_reference_is_refused(make_config, pretrained, reference, tmp_path):
    config = kl_config(make_config, tmp_path / "run", pretrained)
    with pytest.raises(Crash):
        train(config, method=KLToReference(reference), hooks=crash_at(5))
    weights = load_file(str(reference / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(reference / "model.safetensors"))
    with pytest.raises(InputError, match=r"the reference model has changed since the checkpoint"):
        train(config.replace(resume=True), method=KLToReference(reference))


def test_resume_with_another_method_is_refused(make_config, pretrained, reference, tmp_path):
    config = kl_config(make_config, tmp_path / "run", pretrained)
    with pytest.raises(Crash):
        train(config, method=KLToReference(reference), hooks=crash_at(5))
    with pytest.raises(InputError, match="written by the 'kl-to-reference' method"):
        train(config.replace(resume=True))


class InnerEpochs(Pretraining):
    """Takes the whole step itself: `epochs` AdamW updates on the same batch (as PPO does on a rollout)."""

    name = "inner-epochs"

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def step(self, model, optimizer, batches, ctx):
        batch = [next(batches) for _ in range(ctx.accum)]
        for _ in range(self.epochs):
            stats = accumulate_gradients(
                model, iter(batch), optimizer, self.loss, accum=ctx.accum, device=ctx.device, dist=ctx.dist,
                grad_clip=ctx.config.grad_clip,
            )  # fmt: skip
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert isinstance(stats, StepStats)
        return stats


def test_a_method_may_take_its_own_optimizer_steps(make_config, tmp_path):
    kw = dict(max_steps=6, checkpoint_interval=100, eval_interval=100)
    plain = train(make_config(tmp_path / "plain", **kw))
    once = train(make_config(tmp_path / "once", **kw), method=InnerEpochs(1))
    twice = train(make_config(tmp_path / "twice", **kw), method=InnerEpochs(2))

    def adam_steps(run) -> float:
        state = load_file(str(run.checkpoint / "trainer" / "optimizer.safetensors"))
        counts = {float(v) for k, v in state.items() if k.endswith("/step")}  # one count, every parameter
        assert len(counts) == 1
        return counts.pop()

    # one inner epoch is exactly the loop's own step (the loop does not step again after the method)
    la, lb = read_metrics(plain.run_dir / "metrics.jsonl"), read_metrics(once.run_dir / "metrics.jsonl")
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]
    assert adam_steps(plain) == adam_steps(once) == 6 and adam_steps(twice) == 12
    assert read_metrics(twice.run_dir / "metrics.jsonl")[-1]["train_loss"] < lb[-1]["train_loss"]


def embeddings(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]


class FrozenEmbeddings(Pretraining):
    """Freezes the token embedding (found by module type, not by name)."""

    name = "frozen-embeddings"

    def prepare(self, model, ctx):
        frozen = {id(w) for w in embeddings(model)}
        self.frozen_names = [n for n, p in model.named_parameters() if id(p) in frozen]
        for weight in embeddings(model):
            weight.requires_grad_(False)
        return super().prepare(model, ctx)


def test_only_trainable_parameters_reach_the_optimizer(make_config, tmp_path):
    from lmstack.interop.folders import load_model_and_tokenizer
    from lmstack.model import build_model

    method = FrozenEmbeddings()
    untied = {
        **make_config(tmp_path).model,
        "tie_embeddings": False,
    }  # tied, the output layer would freeze too
    run = train(make_config(tmp_path / "frozen", max_steps=4, model=untied), method=method)
    optimizer_state = load_file(str(run.checkpoint / "trainer" / "optimizer.safetensors"))
    trained_names = {k.rpartition("/")[0] for k in optimizer_state}
    assert method.frozen_names and trained_names and not trained_names & set(method.frozen_names)
    # the checkpoint still holds the whole model: the frozen embedding at its initial value, the rest moved
    trained, _ = load_model_and_tokenizer(run.checkpoint)
    fresh = build_model(run.model_config, seed=0)  # the run's initialisation (seed 0)
    assert torch.equal(embeddings(trained)[0], embeddings(fresh)[0])
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), fresh.parameters()) if a.dim() == 2]
    assert sum(moved) == len(moved) - 1  # every matrix but the embedding
