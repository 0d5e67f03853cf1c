"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation").

At each step take the top-k candidates v of the model's next-token distribution and pick

    argmax_v  (1 - α) · p(v | x)  -  α · max_j cos(h_v, h_j)

where h_v is the final hidden state after appending v and h_j those of every earlier token (prompt
included): model confidence minus a degeneration penalty for candidates whose representation repeats
the context. α = 0 is greedy search. The k candidates run as k rows over k copies of the cache; the
chosen row's cache is then copied to every row, and its next-token logits are already computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmstack.errors import InputError
from lmstack.infer.cache import make_cache
from lmstack.infer.request import RowState
from lmstack.infer.sampling import SamplingParams


@dataclass(frozen=True)
class Contrastive:
    """Contrastive search strategy for `generate(..., strategy=Contrastive(0.6, 4))`.

    Honours max_new_tokens, stop_ids, the penalties, no_repeat_ngram_size, logits_processors (all before
    the top-k candidates are taken) and logprobs. Refuses temperature > 0 and the sampling filters
    (its own `top_k` picks the candidates), n > 1 (the search is deterministic: the choices would be
    identical), and the paged cache (candidates reorder cache rows).
    """

    penalty_alpha: float
    top_k: int

    def __post_init__(self) -> None:
        alpha = self.penalty_alpha
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not 0.0 <= alpha <= 1.0
            or math.isnan(alpha)
        ):
            raise InputError(f"Contrastive.penalty_alpha must lie in [0, 1], got {alpha!r} — e.g. 0.6")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 2:
            raise InputError(
                f"contrastive search needs top_k >= 2 candidates, got {self.top_k!r} — e.g. Contrastive(0.6, top_k=4)"
            )

    def check(self, model: torch.nn.Module, params: SamplingParams, cache: str) -> None:
        if not params.greedy:
            raise InputError(
                f"contrastive search is deterministic, got temperature={params.temperature} — use temperature=0"
            )
        if params.top_k is not None:
            raise InputError(
                "contrastive search takes its candidates from Contrastive.top_k — leave top_k=None"
            )
        for name in ("top_p", "min_p"):
            if getattr(params, name) is not None:
                raise InputError(
                    f"contrastive search does not sample, so {name} has no effect — leave {name}=None"
                )
        if params.n > 1:
            raise InputError(
                f"contrastive search is deterministic: n={params.n} choices would be identical — use n=1"
            )
        if cache == "paged":
            raise InputError(
                "contrastive search reorders cache rows — use cache='static', 'hybrid', 'dynamic' or 'rolling'"
            )

    def decode(self, model: torch.nn.Module, prompt: list[int], row: RowState, cache: str) -> None:
        contrastive_search(model, prompt, self, row, cache=cache)


def contrastive_score(
    probs: torch.Tensor, candidate_hidden: torch.Tensor, context_hidden: torch.Tensor, alpha: float
) -> torch.Tensor:
    """(1 - α)·p - α·max cosine similarity: probs (k,), candidate_hidden (k, d), context_hidden (L, d) -> (k,)."""
    sim = F.cosine_similarity(candidate_hidden[:, None, :], context_hidden[None, :, :], dim=-1)  # (k, L)
    return (1.0 - alpha) * probs - alpha * sim.max(dim=-1).values


def contrastive_search(
    model: torch.nn.Module, prompt: list[int], search: Contrastive, row: RowState, *, cache: str = "static"
) -> None:
    """Decode one prompt into `row`, one step of k candidate forwards per new token."""
    config = model.config
    device, dtype = model.device, model.dtype
    k, P = min(search.top_k, config.vocab_size), len(prompt)
    sampler = row.sampler

    kv = make_cache(cache, config, 1, P + row.budget, dtype=dtype, device=device)
    hidden = model.features(torch.tensor([prompt], device=device), cache=kv)  # (1, P, d)
    context = hidden[0]  # (L, d): every token's final hidden state so far
    logits = model.head(hidden[0, -1])  # (V,)
    kv.reorder(torch.zeros(k, dtype=torch.long, device=device))

    for t in range(row.budget):
        probs = torch.softmax(sampler.process(logits).float(), dim=-1)
        top_probs, top_ids = torch.topk(probs, k)
        positions = torch.full((k, 1), P + t, dtype=torch.long, device=device)
        cand_hidden = model.features(top_ids[:, None], positions=positions, cache=kv)[:, -1]  # (k, d)
        score = contrastive_score(top_probs, cand_hidden.float(), context.float(), search.penalty_alpha)
        best = int(torch.argmax(score))
        if row.emit(int(top_ids[best]), logits):
            break
        context = torch.cat((context, cand_hidden[best : best + 1]), 0)
        logits = model.head(cand_hidden[best])
        kv.reorder(torch.full((k,), best, dtype=torch.long, device=device))
