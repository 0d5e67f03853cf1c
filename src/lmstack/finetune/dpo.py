"""Direct Preference Optimization (Rafailov et al. 2023), a `Method` of the one training loop.

For a prompt x with a preferred reply y_w and a dispreferred y_l, the policy π is pushed to raise
y_w's likelihood relative to a frozen reference π_ref more than y_l's:

    r(y) = β · (log π(y|x) − log π_ref(y|x))          the implicit reward (sum over the reply's tokens)
    loss = −log σ(r(y_w) − r(y_l))

β sets how far π may move from π_ref (the KL strength of the RLHF objective DPO solves in closed
form). Logged: the reward margin r(y_w) − r(y_l), the preference accuracy (the fraction of pairs with
r(y_w) > r(y_l)) and the chosen replies' mean per-token NLL.

The reference is the starting model (or another folder), loaded frozen and recorded by path and
weights hash; a resume against other reference weights is refused.

DPO only asks that y_w gain on y_l; it commonly lowers both, y_w less (likelihood displacement, Razin
et al. 2024), and when the two replies share all but a few tokens the model's own answers can fall
apart. `sft_weight` w adds w × the chosen replies' mean per-token NLL to the loss (RPO, Pang et al.
2024; trl's `loss_type=["sigmoid", "sft"]` with `loss_weights=[1, w]`), which keeps y_w likely; the
validation loss then includes it too.

Pairs are rendered like SFT conversations (prompt messages + the reply as assistant message), so the
reply's tokens are the labelled ones; a micro-batch holds the chosen sequences then the rejected ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.finetune.data import (
    IGNORE,
    Example,
    ExampleStats,
    Record,
    fit_length,
    labels_from_mask,
    pad_batch,
    read_records,
)
from lmstack.finetune.sft import SFT
from lmstack.train.method import MethodContext, MetricValue, check_frozen_model, load_frozen_model


@dataclass(frozen=True)
class Pair:
    chosen: Example
    rejected: Example
    line: int = 0


def dpo_pairs(
    tokenizer: Any, records: list[Record], max_len: int, truncate: str
) -> tuple[list[Pair], ExampleStats]:
    """Each record's chosen and rejected conversation as examples, cut to `max_len` by `truncate`; a
    pair either of whose sides is dropped (too long, or no reply token left) is dropped and counted."""
    stats, out = ExampleStats(), []
    for record in records:
        stats.records += 1
        sides, cut = [], False
        for reply in (record.chosen, record.rejected):
            ids, mask = tokenizer.render_chat(list(record.messages + reply))
            fitted = fit_length(ids, labels_from_mask(ids, mask), max_len, truncate)
            cut |= fitted is not None and len(fitted[0]) < len(ids)
            sides.append(fitted)
        if any(s is None for s in sides):
            stats.dropped_too_long += 1
            stats.lines_dropped.append(record.line)
            continue
        if any(all(label == IGNORE for label in s[1][1:]) for s in sides):
            stats.dropped_no_target += 1
            stats.lines_dropped.append(record.line)
            continue
        stats.truncated += cut
        stats.kept += 1
        out.append(
            Pair(Example(*sides[0], line=record.line), Example(*sides[1], line=record.line), record.line)
        )
    return out, stats


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log π(token) over each sequence's labelled tokens (B,), in float32."""
    logits = model(batch["ids"], positions=batch["positions"], attention_mask=batch["mask"])
    targets = batch["labels"][:, 1:]
    logp = logits[:, :-1].float().log_softmax(-1)
    per_token = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (per_token * (targets != IGNORE)).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    *,
    chosen_tokens: torch.Tensor | int,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean DPO loss over pairs from sequence log-probs (each (B,)), and its logged values. The
    chosen replies' mean NLL (over their `chosen_tokens` labelled tokens) is logged and, times
    `sft_weight`, added to the loss (see the module doc)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "reward_margin": margin.detach().mean(),
        "preference_accuracy": (chosen_reward > rejected_reward).float().detach().mean(),
        "chosen_reward": chosen_reward.detach().mean(),
        "rejected_reward": rejected_reward.detach().mean(),
    }
    nll = -policy_chosen.sum() / chosen_tokens
    metrics["chosen_nll"] = nll.detach()
    if sft_weight:
        loss = loss + sft_weight * nll
    return loss, metrics


class DPO(SFT):
    """DPO on `{"prompt", "chosen", "rejected"}` JSONL; see the module docstring."""

    name = "dpo"
    loss_is_nll = False

    def __init__(
        self,
        data: str | Path,
        *,
        beta: float = 0.1,
        sft_weight: float = 0.0,
        reference: str | Path | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(data, packing=False, **kw)
        self.beta, self.sft_weight = beta, sft_weight
        self.reference_spec = reference  # None: the starting model (the tokenizer's folder)

    def examples(self, tokenizer: Any, path: Path, seq_len: int) -> tuple[list[Any], ExampleStats]:
        return dpo_pairs(tokenizer, read_records(path, kind="dpo"), seq_len, self.truncate)

    @staticmethod
    def tokens(item: Any) -> int:
        return len(item.chosen.ids) + len(item.rejected.ids)

    def collate(self, items: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
        return pad_batch([p.chosen for p in items] + [p.rejected for p in items], pad_id)

    val_batch = collate

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        spec = self.reference_spec or self.tokenizer_path
        self.reference, self.reference_record = load_frozen_model(spec, ctx.device)
        if self.reference_spec is None:  # the policy's step 0 (an NF4 base under QLoRA)
            self.reference = self.adapters.frozen_base(self.reference)
        return super().prepare(model, ctx)

    def pair_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = sequence_logps(model, batch)
        with torch.no_grad():
            ref = sequence_logps(self.reference, batch)
        n = policy.shape[0] // 2  # chosen rows first, then rejected
        tokens = (batch["labels"][:n, 1:] != IGNORE).sum()
        return dpo_loss(
            policy[:n],
            policy[n:],
            ref[:n],
            ref[n:],
            self.beta,
            chosen_tokens=tokens,
            sft_weight=self.sft_weight,
        )

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, MetricValue]]:
        return self.pair_loss(model, batch)

    def validation_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        loss, metrics = self.pair_loss(model, batch)
        return loss, batch["ids"].shape[0] // 2, metrics

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, state = super().state_dict()
        return tensors, {
            **state,
            "reference": self.reference_record,
            "beta": self.beta,
            "sft_weight": self.sft_weight,
        }

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        check_frozen_model(state["reference"], self.reference_record)
        super().load_state_dict(tensors, state)
