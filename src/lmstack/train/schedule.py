"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

Warmup ramps the rate from ~0 so the first, noisy Adam updates (whose second-moment estimate is
still poor) cannot throw the model into a bad region (Goyal et al. 2017, gradual warmup); the cosine
then lowers it smoothly so late updates make fine adjustments. It ends at `min_lr`, not 0, so the last
steps still learn (Chinchilla and Llama decay to 10% of the peak).

With a time budget the total number of steps is unknown at the start: it is estimated once warmup
has been timed (`estimate_total_steps`) and then fixed in `Schedule.total_steps`, which is saved in
the trainer state so a resumed run follows the same curve. Before it is known the rate is the warmup
ramp and then the peak (the cosine's first value).

Extending a run (`--resume --extend --max-steps N`) re-plans only the tail: warmup is unchanged, and
from the resume step s the cosine runs afresh from the rate the old plan gave at s down to the floor at
the new total N, so the curve has no jump (a run that had already finished continues at the floor).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any


def lr_at(
    step: int,
    *,
    peak_lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int | None,
    decay_start: int = 0,
    decay_start_lr: float | None = None,
) -> float:
    """Learning rate of optimizer step `step` (1-based: the first update is step 1).

    Steps 1..warmup_steps: peak · step / warmup_steps. After: min + (top − min)·½(1 + cos(π·p)) with
    p = (step − s) / (total − s) clipped to [0, 1], where s = max(warmup, decay_start) and top = the
    peak, or `decay_start_lr` when an extension restarted the cosine after warmup; the floor holds
    past `total_steps`.
    """
    if step <= warmup_steps:
        return peak_lr * step / warmup_steps
    if total_steps is None:
        return peak_lr
    start, top = warmup_steps, peak_lr
    if decay_start > warmup_steps and decay_start_lr is not None:
        start, top = decay_start, decay_start_lr
    span = total_steps - start
    progress = 1.0 if span <= 0 else min(1.0, (step - start) / span)
    return min_lr + (top - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """The run's learning-rate plan; `total_steps` is None until a time budget has been converted."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int | None
    decay_start: int = 0  # set by `extended`: the step the cosine tail restarts from
    decay_start_lr: float | None = None

    def lr(self, step: int) -> float:
        return lr_at(
            step,
            peak_lr=self.peak_lr,
            min_lr=self.min_lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            decay_start=self.decay_start,
            decay_start_lr=self.decay_start_lr,
        )

    def with_total(self, total_steps: int) -> Schedule:
        return replace(self, total_steps=int(total_steps))

    def extended(self, step: int, total_steps: int) -> Schedule:
        """The plan for training on from `step` to a new `total_steps`: the same warmup, then a cosine
        from this plan's rate at `step` to the floor at the new total."""
        if step <= self.warmup_steps:
            return replace(self, total_steps=int(total_steps))
        return replace(
            self, total_steps=int(total_steps), decay_start=int(step), decay_start_lr=self.lr(step)
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        total, start_lr = data.get("total_steps"), data.get("decay_start_lr")
        return cls(
            float(data["peak_lr"]),
            float(data["min_lr"]),
            int(data["warmup_steps"]),
            None if total is None else int(total),
            int(data.get("decay_start", 0)),
            None if start_lr is None else float(start_lr),
        )


def estimate_total_steps(
    *,
    budget_s: float,
    elapsed_s: float,
    step: int,
    step_s: float,
    eval_s: float = 0.0,
    eval_interval: int = 1,
    reserve_s: float = 0.0,
    max_steps: int | None = None,
) -> int:
    """How many steps fit in a time budget, counting from `step` steps done in `elapsed_s` seconds.

    Each further step costs `step_s` plus its share of the periodic evaluation (`eval_s` every
    `eval_interval` steps); `reserve_s` is kept for the final evaluation and checkpoint. Never fewer
    than the steps already done, never more than `max_steps`.
    """
    per_step = step_s + eval_s / max(1, eval_interval)
    remaining = budget_s - elapsed_s - reserve_s
    more = int(remaining // per_step) if per_step > 0 and remaining > 0 else 0
    total = step + more
    return min(total, max_steps) if max_steps is not None else total
