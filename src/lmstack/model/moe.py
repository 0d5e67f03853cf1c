"""Sparse mixture-of-experts feed-forward layer (Shazeer et al. 2017; Mixtral, Jiang et al. 2024).

A linear router scores every expert per token; the top-k experts run on that token and their outputs
are mixed by the softmax router weights (renormalised over the k chosen ones when configured). Only
the selected experts compute: tokens are gathered per expert, so FLOPs per token scale with k, not
with the number of experts, while parameters scale with all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig
from lmstack.model.mlp import MLP


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.renormalize = (
            config.n_experts,
            config.n_experts_per_token,
            config.router_renormalize,
        )
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the mixed output (B, T, d) and the router logits (B*T, E) for the balancing loss."""
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        logits = self.router(flat)  # (N, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        for e in torch.unique(chosen).tolist():  # only experts that received tokens run
            token_idx, slot = torch.where(chosen == e)
            y = self.experts[e](flat[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
        return out.view(B, T, d), logits


def load_balancing_loss(
    router_logits: list[torch.Tensor], n_experts: int, top_k: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss, pooled over all layers: E · Σ_e f_e · P_e.

    f_e = fraction of (token, slot) selections that went to expert e, P_e = mean router probability
    of e, both over the real tokens of every MoE layer (same definition as `transformers`' Mixtral,
    whose f_e sums to k). Minimised when routing is uniform.
    """
    logits = torch.cat(router_logits, dim=0).float()  # (layers * N, E)
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    weight = torch.ones(probs.shape[0], device=probs.device)
    if valid is not None:
        weight = valid.reshape(-1).float().repeat(len(router_logits))
    counts = F.one_hot(chosen, n_experts).float().sum(1)  # (rows, E) selections per row
    total = weight.sum()
    tokens_per_expert = (counts * weight[:, None]).sum(0) / total
    prob_per_expert = (probs * weight[:, None]).sum(0) / total
    return n_experts * torch.sum(tokens_per_expert * prob_per_expert)
