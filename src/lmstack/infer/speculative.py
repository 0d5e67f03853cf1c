"""Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding").

A small draft model proposes k tokens one at a time; the target scores all of them in ONE forward pass
(k + 1 queries offset from the cached keys, which the position-based mask handles) and keeps a prefix:

- greedy: a proposal is kept while it equals the target's argmax; the first disagreement is replaced
  by the target's choice, and if all k agree the target's next token comes free. The output is exactly
  the target's greedy output.
- sampling: proposal d_i (drawn from the draft's distribution q_i) is accepted with probability
  min(1, p_i(d_i) / q_i(d_i)); on the first rejection a token is drawn from the residual
  norm(max(0, p_i - q_i)) and the round ends; if all are accepted one more is drawn from p_{k+1}.
  Each emitted token then follows the target's distribution p exactly (Leviathan et al., Theorem 1).

p and q are the distributions after the request's penalties, temperature and filters, so speculative
sampling matches plain sampling with the same settings. After each round both caches are truncated
to the accepted prefix (a rolling cache keeps k spare slots so that truncation loses nothing). Every
random decision goes through a `Chooser`, which lets the tests enumerate all outcomes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.errors import InputError
from lmstack.infer.cache import make_cache
from lmstack.infer.request import Generation, RowState
from lmstack.infer.sampling import RequestSampler, SamplingParams


@dataclass(frozen=True)
class Speculative:
    """Speculative decoding strategy for `generate(..., strategy=Speculative(draft, k=4))`.

    Honours every SamplingParams option: greedy output equals the target's, sampled output follows the
    target's processed distribution (penalties, logits processors, temperature, filters), logprobs come
    from the target's raw logits, and n choices are n independent runs seeded `seed + i`. Refuses a
    draft that does not share the target's tokenizer.
    """

    draft: torch.nn.Module
    k: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.draft, torch.nn.Module) or not hasattr(self.draft, "config"):
            raise InputError(f"Speculative.draft must be an lmstack model, got {type(self.draft).__name__}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InputError(f"Speculative.k must be an integer >= 1, got {self.k!r} — e.g. 4")

    def check(self, model: torch.nn.Module, params: SamplingParams, cache: str) -> None:
        check_same_tokenizer(model, self.draft)

    def decode(self, model: torch.nn.Module, prompt: list[int], row: RowState, cache: str) -> None:
        speculative_generate(model, self.draft, prompt, row, k=self.k, cache=cache)


class Chooser:
    """The random decisions of speculative sampling, drawn from one request's generator."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def categorical(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def bernoulli(self, p: float) -> bool:
        return bool(torch.rand((), generator=self.generator, device=self.generator.device) < p)


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, token: int) -> float:
    """min(1, p(token) / q(token)) — q(token) > 0 because the draft drew the token from q."""
    return min(1.0, float(p[token]) / float(q[token]))


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): what to draw from after a rejection (p itself if p == q numerically)."""
    r = (p - q).clamp_min(0)
    total = r.sum()
    return r / total if float(total) > 0 else p


def check_same_tokenizer(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    target_hash: str | None = None,
    draft_hash: str | None = None,
) -> None:
    """Target and draft must speak the same ids: compare tokenizer content hashes when both are known
    (an argument, or a `tokenizer_hash` attribute set by the loader), else the vocabulary sizes."""
    target_hash = target_hash or getattr(target, "tokenizer_hash", None)
    draft_hash = draft_hash or getattr(draft, "tokenizer_hash", None)
    if target_hash and draft_hash:
        if target_hash != draft_hash:
            raise InputError(
                f"the draft's tokenizer (hash {draft_hash[:12]}…) differs from the target's ({target_hash[:12]}…) — "
                "use a draft trained with the same tokenizer"
            )
    elif target.config.vocab_size != draft.config.vocab_size:
        raise InputError(
            f"the draft's vocabulary ({draft.config.vocab_size} ids) differs from the target's "
            f"({target.config.vocab_size}) — use a draft trained with the same tokenizer"
        )


def speculative_generate(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    prompt: list[int],
    row: RowState,
    *,
    k: int = 4,
    cache: str = "static",
    chooser: Chooser | None = None,
) -> Generation:
    """Decode one prompt into `row` (and return its result); `stats` reports proposals, acceptances, the
    acceptance rate and target calls."""
    params, max_new_tokens = row.params, row.budget
    device = target.device
    if chooser is None and not params.greedy:
        chooser = Chooser(row.sampler.generator)  # the request's own seeded generator
    max_len = len(prompt) + max_new_tokens + k
    caches = {}
    for name, model in (("target", target), ("draft", draft)):
        kind = cache if (cache != "rolling" or model.config.sliding_window is not None) else "static"
        caches[name] = make_cache(
            kind, model.config, 1, max_len, dtype=model.dtype, device=model.device, extra=k
        )
    target_cache, draft_cache = caches["target"], caches["draft"]
    # Invariant between rounds: each cache holds seq[:-1] except its pending tokens, which it is fed next.
    if len(prompt) > 1:
        head = torch.tensor([prompt[:-1]], device=device)
        target(head, cache=target_cache)
        draft(head, cache=draft_cache)
    draft_pending = [prompt[-1]]
    sampler = row.sampler  # penalties see prompt + accepted tokens
    seq = list(prompt)
    result = row.result
    proposed = accepted = target_calls = 0

    while len(result.tokens) < max_new_tokens:
        n = len(seq)
        # propose no more than the budget allows, nor past the end of the draft's context
        k_round = min(k, max_new_tokens - len(result.tokens) - 1, max(0, draft.config.max_seq_len - n))
        # ---- draft: propose k_round tokens, one forward each -------------------------------------
        proposals, q = [], []
        if k_round > 0:
            logits = _forward(draft, draft_pending, n - len(draft_pending), draft_cache)[-1]
            for i in range(k_round):
                dist = _distribution(sampler, logits, seq + proposals)
                token = int(torch.argmax(dist)) if params.greedy else chooser.categorical(dist)
                proposals.append(token)
                q.append(dist)
                if i < k_round - 1:
                    logits = _forward(draft, [token], n + i, draft_cache)[-1]
        # ---- target: score the pending token and every proposal in one forward ---------------
        target_logits = _forward(target, [seq[-1]] + proposals, n - 1, target_cache)  # (k_round + 1, V)
        target_calls += 1
        proposed += k_round
        new = []
        for i in range(k_round + 1):
            p = _distribution(sampler, target_logits[i], seq + new)
            if i == k_round:  # every proposal accepted: the target's next token comes free
                new.append(int(torch.argmax(p)) if params.greedy else chooser.categorical(p))
                break
            d = proposals[i]
            if params.greedy:
                keep = d == int(torch.argmax(p))
            else:
                keep = chooser.bernoulli(acceptance_probability(p, q[i], d))
            if keep:
                new.append(d)
                continue
            new.append(
                int(torch.argmax(p)) if params.greedy else chooser.categorical(residual_distribution(p, q[i]))
            )
            break
        n_accepted = len(new) - 1
        accepted += n_accepted

        # ---- emit, honouring stop ids, the budget and the callback ---------------------------------
        for i, token in enumerate(new):
            seq.append(token)
            if row.emit(token, target_logits[i]):
                break
        if row.done:
            break
        # ---- roll both caches back to the accepted prefix ---------------------------------------
        target_cache.truncate(n + n_accepted)
        if k_round == 0:  # the draft sat this round out
            draft_pending = draft_pending + [new[-1]]
        elif n_accepted < k_round:
            draft_cache.truncate(n + n_accepted)
            draft_pending = [new[-1]]
        else:  # the draft never saw its own last proposal
            draft_pending = [proposals[-1], new[-1]]

    result.stats |= {
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "target_calls": target_calls,
    }
    return result


def _forward(model: torch.nn.Module, tokens: list[int], start: int, cache) -> torch.Tensor:
    """Logits (T, V) for `tokens` at positions start.. start+T-1 on top of `cache`."""
    device = model.device
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    positions = torch.arange(start, start + len(tokens), device=device)[None]
    return model(ids, positions=positions, cache=cache)[0]


def _distribution(sampler: RequestSampler, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
    """The request's processed next-token distribution (V,) in float32 (greedy: the processed logits)."""
    processed = sampler.process(logits, history=history)
    if sampler.params.greedy:
        return processed
    return torch.softmax(processed.float(), dim=-1)
