"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation").

At each step take the top-k candidates v of the model's next-token distribution and pick

    argmax_v  (1 - α) · p(v | x)  -  α · max_j cos(h_v, h_j)

where h_v is the final hidden state after appending v and h_j those of every earlier token (prompt
included): model confidence minus a degeneration penalty for candidates whose representation repeats
the context. α = 0 is greedy search. The k candidates run as k rows over k copies of the cache; the
chosen row's cache is then copied to every row, and its next-token logits are already computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmstack.infer.cache import make_cache
from lmstack.infer.generate import Generation
from lmstack.infer.sampling import RequestSampler, SamplingParams


def contrastive_score(
    probs: torch.Tensor, candidate_hidden: torch.Tensor, context_hidden: torch.Tensor, alpha: float
) -> torch.Tensor:
    """(1 - α)·p - α·max cosine similarity: probs (k,), candidate_hidden (k, d), context_hidden (L, d) -> (k,)."""
    sim = F.cosine_similarity(candidate_hidden[:, None, :], context_hidden[None, :, :], dim=-1)  # (k, L)
    return (1.0 - alpha) * probs - alpha * sim.max(dim=-1).values


def contrastive_search(
    model: torch.nn.Module,
    prompt: list[int],
    *,
    top_k: int,
    penalty_alpha: float,
    max_new_tokens: int,
    params: SamplingParams,
    cache: str = "static",
    on_token: Callable[[int], object] | None = None,
) -> Generation:
    config = model.config
    device, dtype = model.device, model.dtype
    k, P = min(top_k, config.vocab_size), len(prompt)
    sampler = RequestSampler(params, prompt, config.vocab_size, device)

    kv = make_cache(cache, config, 1, P + max_new_tokens, dtype=dtype, device=device)
    hidden = model.features(torch.tensor([prompt], device=device), cache=kv)  # (1, P, d)
    context = hidden[0]  # (L, d): every token's final hidden state so far
    logits = model.head(hidden[0, -1])  # (V,)
    kv.reorder(torch.zeros(k, dtype=torch.long, device=device))

    result = Generation([], "length")
    for t in range(max_new_tokens):
        probs = torch.softmax(sampler.process(logits).float(), dim=-1)
        top_probs, top_ids = torch.topk(probs, k)
        positions = torch.full((k, 1), P + t, dtype=torch.long, device=device)
        cand_hidden = model.features(top_ids[:, None], positions=positions, cache=kv)[:, -1]  # (k, d)
        score = contrastive_score(top_probs, cand_hidden.float(), context.float(), penalty_alpha)
        best = int(torch.argmax(score))
        token = int(top_ids[best])
        result.tokens.append(token)
        sampler.record(token)
        stop_now = on_token(token) if on_token is not None else None
        if token in (params.stop_ids or ()) or stop_now:
            result.finish_reason = "stop"
            break
        context = torch.cat((context, cand_hidden[best : best + 1]), 0)
        logits = model.head(cand_hidden[best])
        kv.reorder(torch.full((k,), best, dtype=torch.long, device=device))
    return result
