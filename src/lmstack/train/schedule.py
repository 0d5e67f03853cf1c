"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

Warmup ramps the rate from ~0 so the first, noisy Adam updates (whose second-moment estimate is
still poor) cannot throw the model into a bad region (seed 001, "learning rate warm-up"); the cosine
then lowers it smoothly so late updates make fine adjustments. It ends at `min_lr`, not 0, so the last
steps still learn (Chinchilla and Llama decay to 10% of the peak).

With a time budget the total number of steps is unknown at the start: it is estimated once warmup
has been timed (`estimate_total_steps`) and then fixed in `Schedule.total_steps`, which is saved in
the trainer state so a resumed run follows the same curve. Before it is known the rate is the warmup
ramp and then the peak (the cosine's first value).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any


def lr_at(step: int, *, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int | None) -> float:
    """Learning rate of optimizer step `step` (1-based: the first update is step 1).

    Steps 1..warmup_steps: peak · step / warmup_steps. After: min + (peak − min)·½(1 + cos(π·p)) with
    p = (step − warmup) / (total − warmup) clipped to [0, 1]; the floor holds past `total_steps`.
    """
    if step <= warmup_steps:
        return peak_lr * step / warmup_steps
    if total_steps is None:
        return peak_lr
    span = total_steps - warmup_steps
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """The run's learning-rate plan; `total_steps` is None until a time budget has been converted."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int | None

    def lr(self, step: int) -> float:
        return lr_at(
            step,
            peak_lr=self.peak_lr,
            min_lr=self.min_lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
        )

    def with_total(self, total_steps: int) -> Schedule:
        return replace(self, total_steps=int(total_steps))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        total = data.get("total_steps")
        return cls(
            float(data["peak_lr"]),
            float(data["min_lr"]),
            int(data["warmup_steps"]),
            None if total is None else int(total),
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
