"""The one training loop: raw text (or a prepared dataset) to a checkpointed causal language model.

    check inputs ─► run folder ─► data ─► model (fresh or init_from) ─► method.prepare ─► optimizer
        ─► for step: micro-batches → method.loss → backward (accumulate) → clip → AdamW
                     └─ eval at intervals, checkpoint at intervals, metrics.jsonl

`train()` runs these steps in order; each building step is a function below. What a training method
changes (which parameters train, which batches, which loss) comes from a `Method` (method.py);
pretraining (pretrain.py) is the default. A step (step.py) accumulates gradients over micro-batches
until it has seen `batch_size` sequences, averaged over data-parallel processes by DDP, clips them,
and AdamW updates the weights at the scheduled learning rate (schedule.py). Checkpoints
(checkpoint.py) hold everything a resume needs, the method's own state included.

Determinism: every random choice is seeded (model init, the data order, dropout through torch's
generator, whose state is checkpointed), so on CPU with a fixed thread count a resumed run matches an
uninterrupted one bit for bit. `TrainHooks` lets a caller observe or interrupt the run at
well-defined instants (tests use it to crash on purpose).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.config import ModelConfig
from lmstack.errors import InputError, RunError
from lmstack.train import checkpoint as ckpt
from lmstack.train import distributed as dist_mod
from lmstack.train.build import (
    RunData,
    build_data,
    build_model,
    make_optimizer,
    method_context,
    open_run,
    set_threads,
)
from lmstack.train.config import TrainConfig
from lmstack.train.distributed import DistInfo
from lmstack.train.evaluate import bits_per_byte, shard_loss
from lmstack.train.method import Method, MethodContext
from lmstack.train.metrics import (
    METRICS_FILE,
    MetricsLog,
    format_duration,
    measure_peak_flops,
    plot_curves,
    training_flops_per_token,
)
from lmstack.train.optim import load_optimizer_tensors, optimizer_tensors, set_lr
from lmstack.train.prepare import (
    check_inputs,
    config_hash,
)
from lmstack.train.pretrain import Pretraining
from lmstack.train.schedule import Schedule, estimate_total_steps
from lmstack.train.step import StepStats, accumulate_gradients


@dataclass
class TrainHooks:
    """Optional callbacks. `on_step_start(step, model)` runs before step `step`; `on_step_end(step,
    record)` after its metrics line is written; `on_checkpoint(stage, path)` at the checkpoint stages
    "written", "renamed", "pointed" (see `checkpoint.save_checkpoint`). To change the loss, write a
    `Method`."""

    on_step_start: Callable[[int, nn.Module], None] | None = None
    on_step_end: Callable[[int, dict[str, Any]], None] | None = None
    on_checkpoint: Callable[[str, Path], None] | None = None


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None
    step: int
    stop_reason: str
    initial_val_loss: float | None
    val_loss: float | None
    val_perplexity: float | None
    val_bits_per_byte: float | None
    tokens_per_s: float | None
    mfu: float | None
    sample: str | None
    notes: list[str] = field(default_factory=list)
    model_config: ModelConfig | None = None


def train(
    config: TrainConfig, *, method: Method | None = None, hooks: TrainHooks | None = None
) -> TrainResult:
    """Train (or resume, with `config.resume`) a model as `config` says, by `method` (default:
    `Pretraining()`); see the module docstring. Every input is checked before any work starts."""
    info = dist_mod.setup(config.device)
    try:
        set_threads(config, info)
        check_inputs(config, info)
        run_dir, latest = open_run(config, info)
        data = build_data(config, run_dir, info)
        model = build_model(config, data, info)
        method = method or Pretraining()
        ctx = method_context(config, run_dir, data, info)
        # seeded before the method draws anything (an adapter's init), so a fresh run repeats exactly;
        # dropout masks then differ across data-parallel replicas, and a resume restores the state
        torch.manual_seed(config.seed + info.rank)
        model = method.prepare(model, ctx)
        batches = method.batches(ctx)
        optimizer = make_optimizer(config, model, info.device)
        loop = _Loop(
            config, info, hooks or TrainHooks(), run_dir, data, model, method, ctx, batches, optimizer
        )
        if latest is not None:
            loop.restore(latest)
        elif info.is_main and config.resume:
            loop.say(f"no complete checkpoint in {run_dir}; starting from step 0")
            loop.metrics.truncate(-1)
        dist_mod.barrier(info)
        return loop.run()
    finally:
        dist_mod.teardown(info)


# ------------------------------------------------------------------------------------------ running


class _Loop:
    """One run's changing state (step, schedule, timing) and the steps that change it; `run()` is the
    loop. Private: `train()` builds its pieces and is the entry point."""

    def __init__(
        self, config: TrainConfig, info: DistInfo, hooks: TrainHooks, run_dir: Path, data: RunData,
        model: nn.Module, method: Method, ctx: MethodContext, batches: Any, optimizer: torch.optim.Optimizer,
    ) -> None:  # fmt: skip
        c = config
        self.config, self.info, self.hooks, self.run_dir = config, info, hooks, run_dir
        self.dataset, self.tokenizer, self.seq_len = data.dataset, data.tokenizer, data.seq_len
        self.micro, self.accum = data.micro, data.accum
        self.model, self.method, self.ctx, self.batches, self.optimizer = (
            model,
            method,
            ctx,
            batches,
            optimizer,
        )
        self.model_config: ModelConfig = model.config
        self.device = info.device
        self.precision, self.autocast = ctx.precision, ctx.autocast
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.notes: list[str] = []
        self.clock_start = time.perf_counter()
        self.last_plot = self.clock_start
        self.latest: Path | None = None
        # with a time budget the total is planned once warmup is timed (capped by max_steps)
        planned = None if c.effective_time_budget is not None else c.max_steps
        self.schedule = Schedule(c.lr, c.lr * c.min_lr_ratio, c.warmup_steps, planned)
        self.metrics = MetricsLog(run_dir / METRICS_FILE)
        self.step, self.elapsed_before = 0, 0.0
        self.tokens_seen = 0
        self.initial_val_loss: float | None = None
        self.budget_s = None if c.effective_time_budget is None else 60.0 * c.effective_time_budget

    def say(self, message: str) -> None:
        if self.info.is_main and self.config.progress:
            print(f"train: {message}", file=sys.stderr, flush=True)

    def start(self) -> None:
        """Wrap the model for DDP (and compile), and fix the MFU constants: after any restore."""
        c = self.config
        self.trained = dist_mod.wrap(self.model, self.info)
        if c.compile:
            self.trained = torch.compile(self.trained)
        self.flops_per_token, flops_source = training_flops_per_token(self.model_config, self.seq_len)
        if "locally" in flops_source:
            self.notes.append(f"MFU uses {flops_source}")
        self.peak_dtype = (
            torch.bfloat16
            if self.precision in ("bf16", "fp16") and self.device.type == "cuda"
            else torch.float32
        )
        self.peak_flops = c.peak_flops or measure_peak_flops(self.device, self.peak_dtype)

    def restore(self, path: Path) -> None:
        """Continue from checkpoint `path`: weights, optimizer, schedule, method state (data position),
        RNG, metrics."""
        state, tensors = ckpt.read_trainer_state(path)
        if state.get("model_config_hash") != config_hash(self.model_config):
            saved = state.get("model_config", {})
            ours = self.model_config.to_dict()
            diff = sorted(
                k
                for k in set(saved) | set(ours)
                if k not in ("name", "dropout") and saved.get(k) != ours.get(k)
            )
            raise InputError(
                f"the model config differs from the checkpoint's {path} (fields: {', '.join(diff) or '?'}) — resume "
                "with the run's original preset and model settings, or start a new run with another --out"
            )
        # old checkpoints (before methods) kept the pretraining data position at the top level
        saved_method = state.get("method") or {
            "name": Pretraining.name,
            "state": {"data_position": state["data_position"]},
        }
        if saved_method["name"] != self.method.name:
            raise InputError(
                f"checkpoint {path} was written by the {saved_method['name']!r} method, this run trains with "
                f"{self.method.name!r} — resume with the same method, or start a new run with another --out"
            )
        ckpt.load_model_weights(self.model, path)
        load_optimizer_tensors(self.optimizer, tensors, state["optimizer"])
        self.method.load_state_dict(ckpt.read_method_tensors(path), saved_method["state"])
        self.step = int(state["step"])
        self.schedule = Schedule.from_dict(state["schedule"])
        if self.config.extend:
            self.schedule = self.schedule.extended(self.step, self.config.max_steps)
            self.say(f"extending to {self.config.max_steps} steps: cosine from step {self.step}")
        if state.get("scaler") and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        if len(rng) == self.info.world_size:
            ckpt.set_rng_state(rng[self.info.rank])
        else:
            self.notes.append(
                f"resumed on {self.info.world_size} processes from {len(rng)}: dropout masks re-seeded"
            )
            torch.manual_seed(self.config.seed + 1_000_003 * state["step"] + self.info.rank)
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.initial_val_loss = state.get("initial_val_loss")
        self.latest = path
        if self.info.is_main:
            self.metrics.truncate(self.step)
        self.say(f"resumed from {path} at step {self.step}")

    # ---- pieces of a step ---------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.clock_start

    def train_step(self) -> tuple[StepStats, bool]:
        """The method's own step if it takes one (then the weights are already updated: True), else
        the gradients of `method.loss` accumulated over the batch, clipped (False)."""
        own = self.method.step(self.trained, self.optimizer, self.batches, self.ctx)
        if own is not None:
            return own, True
        stats = accumulate_gradients(
            self.trained, self.batches, self.optimizer, self.method.loss, accum=self.accum, autocast=self.autocast,
            scaler=self.scaler, grad_clip=self.config.grad_clip, device=self.device, dist=self.info,
        )  # fmt: skip
        return stats, False

    def evaluate(self, max_batches: int | None) -> dict[str, float]:
        nll, count = shard_loss(
            self.trained, self.dataset.val_path, seq_len=self.seq_len, batch_size=self.micro, max_batches=max_batches,
            device=self.device, autocast=self.autocast, dist=self.info,
        )  # fmt: skip
        loss = nll / count
        # bits per byte over the whole split: the mean loss stands for every val token
        bpb = bits_per_byte(loss * self.dataset.val_tokens, self.dataset.val_text_bytes)
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 700.0)),
            "val_bpb": bpb,
            "val_tokens_scored": count,
        }

    def save(self, step: int) -> Path:
        tensors, meta = optimizer_tensors(self.optimizer)
        method_tensors, method_state = self.method.state_dict()
        rng = dist_mod.gather_objects(ckpt.rng_state(), self.info)
        path = ckpt.step_dir(self.run_dir, step)
        if self.info.is_main:
            state = {
                "step": step,
                "tokens_seen": self.tokens_seen,
                "elapsed_s": self.elapsed(),
                "schedule": self.schedule.to_dict(),
                "model_config_hash": config_hash(self.model_config),
                "model_config": self.model_config.to_dict(),
                "train_config": self.config.to_dict(),
                "dataset_version": self.dataset.version,
                "method": {"name": self.method.name, "state": method_state},
                "rng": rng,
                "optimizer": meta,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "world_size": self.info.world_size,
                "initial_val_loss": self.initial_val_loss,
            }
            path = ckpt.save_checkpoint(
                self.run_dir, step, self.model, tokenizer=self.tokenizer, optimizer_tensors=tensors,
                trainer_state=state, method_tensors=method_tensors, keep=self.config.keep_checkpoints,
                on_stage=self.hooks.on_checkpoint,
            )  # fmt: skip
            if time.perf_counter() - self.last_plot > 60:  # refresh the plots of a long run now and then
                plot_curves(self.metrics.records(), self.run_dir)
                self.last_plot = time.perf_counter()
        dist_mod.barrier(self.info)
        return path

    def maybe_fix_total(self, step_times: list[float], eval_s: float) -> None:
        """With a time budget, fix the total number of steps once warmup has been timed."""
        c = self.config
        if self.budget_s is None or self.schedule.total_steps is not None:
            return
        if self.step < max(c.warmup_steps, 10) or not step_times:
            return
        timed = sorted(step_times[1:] or step_times)  # the first step pays one-off costs
        step_s = timed[len(timed) // 2]  # the median: robust to a stall on a shared machine
        full_eval_s = eval_s * max(1.0, self.val_batches / max(1, c.eval_batches or self.val_batches))
        total = estimate_total_steps(
            budget_s=self.budget_s, elapsed_s=self.elapsed(), step=self.step, step_s=step_s,
            eval_s=eval_s, eval_interval=c.eval_interval, reserve_s=full_eval_s + 0.05 * self.budget_s,
            max_steps=c.max_steps,
        )  # fmt: skip
        total = int(dist_mod.broadcast_object(total, self.info))  # every rank must stop at the same step
        self.schedule = self.schedule.with_total(total)
        self.say(f"time budget {c.effective_time_budget:g} min: planned {total} steps")

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self.start()
        c, info = self.config, self.info
        self.val_batches = -(-max(1, (self.dataset.val_tokens - 1) // self.seq_len) // self.micro)
        tokens_per_step = c.batch_size * self.seq_len
        self.say(
            f"{self.model.num_parameters():,} parameters, {self.dataset.train_tokens:,} training tokens, "
            f"{c.batch_size}×{self.seq_len} tokens per step ({self.accum} accumulation × {self.micro} × "
            f"{info.world_size} processes), {self.precision} on {self.device}; run folder {self.run_dir}"
        )
        eval_s = 0.0
        if self.step == 0:
            start = time.perf_counter()
            first = self.evaluate(c.eval_batches)
            eval_s = time.perf_counter() - start
            self.initial_val_loss = first["val_loss"]
            if info.is_main:
                self.metrics.append(
                    {"step": 0, "train_loss": None, "lr": 0.0, **first, "elapsed_s": round(self.elapsed(), 3)}
                )
        bar = self._progress_bar()
        step_times: list[float] = []
        stop_reason, record = "max_steps", {}
        last_saved = self.step if self.latest is not None else None
        ema_tps = None
        self.model.train()
        while self.schedule.total_steps is None or self.step < self.schedule.total_steps:
            if c.max_steps is not None and self.step >= c.max_steps:
                break
            step = self.step + 1
            if self.hooks.on_step_start is not None:
                self.hooks.on_step_start(step, self.model)
            lr = self.schedule.lr(step)
            set_lr(self.optimizer, lr)
            started = time.perf_counter()
            stats, stepped = self.train_step()
            loss, grad_norm, aux = stats.loss, stats.grad_norm, stats.aux_loss
            if not math.isfinite(loss) or (self.scaler is None and not math.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                kept = ckpt.latest_checkpoint(self.run_dir, verify=False)
                bad = loss if not math.isfinite(loss) else grad_norm
                what = f"the {'training loss' if bad is loss else 'gradient norm'} became {'NaN' if math.isnan(bad) else bad}"
                when = "after the method's own update" if stepped else "before updating the weights"
                raise RunError(
                    f"{what} at step {step}; the run stopped {when} and kept its last good "
                    f"checkpoint ({kept or 'none written yet'}) — lower the learning rate or use fp32, then continue "
                    "with --resume"
                )
            if stepped:  # the method updated the weights itself
                pass
            elif self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            step_s = time.perf_counter() - started
            step_times.append(step_s)
            self.step = step
            self.tokens_seen += tokens_per_step
            tps = tokens_per_step / step_s
            ema_tps = tps if ema_tps is None else 0.9 * ema_tps + 0.1 * tps
            mfu = tps * self.flops_per_token / (self.peak_flops * info.world_size)
            self.maybe_fix_total(step_times, eval_s)
            total = self.schedule.total_steps
            over_budget = self.budget_s is not None and self.elapsed() > self.budget_s * 1.05 + 5
            if self.budget_s is not None and info.enabled:  # clocks differ: stop together if any rank ran out
                over_budget = bool(
                    dist_mod.all_reduce_sum(torch.tensor([float(over_budget)], dtype=torch.float64), info)[0]
                )
            final = (
                (total is not None and step >= total)
                or (c.max_steps is not None and step >= c.max_steps)
                or over_budget
            )
            record = {
                "step": step, "train_loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens_seen,
                "tokens_per_s": round(tps, 1), "mfu": round(mfu, 5),
                "elapsed_s": round(self.elapsed(), 3), **stats.metrics, **self.method.log(),
            }  # fmt: skip
            if aux is not None:
                record["aux_loss"] = aux
            if final or step % c.eval_interval == 0:
                started = time.perf_counter()
                record.update(self.evaluate(None if final else c.eval_batches))
                if not final:
                    eval_s = time.perf_counter() - started
                if (
                    not c.peak_flops
                ):  # on a shared machine one measurement may catch a busy moment: keep the best
                    self.peak_flops = max(
                        self.peak_flops, measure_peak_flops(self.device, self.peak_dtype, 0.2)
                    )
            if info.is_main:
                self.metrics.append(record)
            if self.hooks.on_step_end is not None:
                self.hooks.on_step_end(step, record)
            if bar is not None:
                self._update_bar(bar, record, ema_tps, mfu, total)
            if final or step % c.checkpoint_interval == 0:
                self.save(step)
                last_saved = step
            if over_budget:
                stop_reason = "time budget overrun"
                self.notes.append("stopped early: the time budget ran out before the planned steps")
                break
            if final:
                stop_reason = (
                    "max_steps" if c.max_steps is not None and step >= c.max_steps else "time budget"
                )
                break
        if bar is not None:
            bar.close()
        return self._finish(record, last_saved, stop_reason)

    # ---- reporting -----------------------------------------------------------------------------
    def _progress_bar(self) -> Any:
        if not (self.info.is_main and self.config.progress):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.schedule.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def _update_bar(
        self, bar: Any, record: dict[str, Any], tps: float, mfu: float, total: int | None
    ) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        postfix = {"loss": f"{record['train_loss']:.3f}", "tok/s": f"{tps:,.0f}", "mfu": f"{100 * mfu:.1f}%"}
        if "val_loss" in record:
            postfix["val"] = f"{record['val_loss']:.3f}"
        if self.budget_s is not None:
            postfix["left"] = format_duration(self.budget_s - self.elapsed())
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)

    def _finish(self, record: dict[str, Any], last_saved: int | None, stop_reason: str) -> TrainResult:
        info = self.info
        if "val_loss" not in record:  # resumed at the end of a finished run: evaluate what is there
            record = {**record, **self.evaluate(None)}
        if last_saved != self.step:
            self.save(self.step)
        path = ckpt.latest_checkpoint(self.run_dir, verify=False)
        sample = self._sample() if info.is_main and self.config.sample_tokens else None
        if info.is_main:
            plot_curves(self.metrics.records(), self.run_dir)
        dist_mod.barrier(info)  # no process leaves (and tears down the group) while another still works
        tps = [r["tokens_per_s"] for r in self.metrics.records() if r.get("tokens_per_s")]
        median_tps = sorted(tps)[len(tps) // 2] if tps else None
        return TrainResult(
            run_dir=self.run_dir,
            checkpoint=path,
            step=self.step,
            stop_reason=stop_reason,
            initial_val_loss=self.initial_val_loss,
            val_loss=record.get("val_loss"),
            val_perplexity=record.get("val_ppl"),
            val_bits_per_byte=record.get("val_bpb"),
            tokens_per_s=median_tps,
            mfu=None
            if median_tps is None
            else median_tps * self.flops_per_token / (self.peak_flops * info.world_size),
            sample=sample,
            notes=self.notes,
            model_config=self.model_config,
        )

    def _sample(self) -> str | None:
        """A short generation from the trained model, through the inference engine's `generate`."""
        try:
            from lmstack.infer import generate
        except ImportError:
            self.notes.append("no sample: lmstack.infer.generate is not available")
            return None
        tok, c = self.tokenizer, self.config
        prompt = ([tok.eos_id] if tok.eos_id is not None else []) + tok.encode_ordinary(c.sample_prompt)
        self.model.eval()
        with torch.no_grad():
            new = generate(
                self.model, [prompt], max_new_tokens=c.sample_tokens, temperature=0.8, top_k=50, seed=c.seed
            )
        self.model.train()
        return c.sample_prompt + tok.decode(new[0])
