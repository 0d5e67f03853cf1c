"""What a request is and how one of its choices advances: shared by generate, every strategy and the Engine.

- `resolve_params`: a `SamplingParams` plus keyword overrides (unknown names are errors);
- `normalise_prompts`, `context_budget`: the checks every prompt passes where it enters;
- `default_stop_ids`: the model's EOS ids when a request names none;
- `RowState`: one choice being generated. `emit(token, logits)` is the single place where a new token
  is recorded, its log-probabilities taken, the streaming callback called and the stop ids and the
  token budget checked — for the batched loop, beam, contrastive and speculative decoding and the Engine;
- `Generation` (what a choice produced) and `TokenEvent` (one token of an Engine request).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmstack.errors import InputError
from lmstack.infer.sampling import SAMPLING_FIELDS, RequestSampler, SamplingParams, token_logprobs


@dataclass
class Generation:
    """What one choice produced. Log-probabilities come from the raw model distribution (softmax of the
    logits before penalties, temperature or filters), so they describe the model, not the sampler."""

    tokens: list[int]
    finish_reason: str  # "stop" (a stop id or stop string) or "length" (max_new_tokens or the context)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    stats: dict = field(default_factory=dict)  # e.g. speculative acceptance rate, beam score
    text: str | None = None  # filled by generate_text


@dataclass
class TokenEvent:
    """One new token of one Engine request. `token` is None only for a request that ends without a new
    token (cancelled, or a prompt that already fills the context)."""

    request_id: int
    token: int | None
    logprob: float | None
    finished: bool
    finish_reason: str | None = None  # "stop", "length" or "cancelled" once finished
    top_logprobs: list[tuple[int, float]] | None = None


# ---- the request's settings ------------------------------------------------------------------------
def resolve_params(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    """`params` (default `SamplingParams()`) with `overrides` applied; a keyword that is not a field is an
    error naming it and the valid ones (strategy options point to their strategy object)."""
    unknown = sorted(set(overrides) - set(SAMPLING_FIELDS))
    if unknown:
        hints = {name: STRATEGY_OPTIONS[name] for name in unknown if name in STRATEGY_OPTIONS}
        hint = "; ".join(f"{k} now goes in strategy={v}" for k, v in hints.items())
        raise InputError(
            f"unknown generation option(s) {', '.join(unknown)} — "
            + (f"{hint}; " if hint else "")
            + f"valid SamplingParams fields: {', '.join(SAMPLING_FIELDS)}"
        )
    if params is not None and not isinstance(params, SamplingParams):
        raise InputError(
            f"params must be a SamplingParams, got {type(params).__name__} — build SamplingParams(...)"
        )
    base = params if params is not None else SamplingParams()
    return dataclasses.replace(base, **overrides) if overrides else base


STRATEGY_OPTIONS = {
    "num_beams": "Beam(num_beams, length_penalty, early_stopping)",
    "length_penalty": "Beam(num_beams, length_penalty, early_stopping)",
    "early_stopping": "Beam(num_beams, length_penalty, early_stopping)",
    "penalty_alpha": "Contrastive(penalty_alpha, top_k)",
    "draft": "Speculative(draft, k)",
    "speculate_k": "Speculative(draft, k)",
}


def default_stop_ids(params: SamplingParams, config) -> SamplingParams:
    """`params` with `stop_ids=None` replaced by the model's EOS ids (all of them, see ModelConfig.eos_ids)."""
    if params.stop_ids is not None:
        return params
    return dataclasses.replace(params, stop_ids=frozenset(config.eos_ids))


# ---- prompts -----------------------------------------------------------------------------------------
def normalise_prompts(prompt_ids, vocab_size: int) -> list[list[int]]:
    """A list of token-id lists from a (B, T) or (T,) tensor, a list of lists or one flat list; checked."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
        if prompt_ids.dim() != 2:
            raise InputError(
                f"prompt_ids tensor must be (batch, seq_len), got shape {tuple(prompt_ids.shape)}"
            )
        prompts = prompt_ids.tolist()
    else:
        prompts = list(prompt_ids)
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            prompts = [prompts]  # one prompt given as a flat list
        prompts = [list(p) for p in prompts]
    if not prompts:
        raise InputError("no prompts given — pass a list of token-id lists, e.g. [[1, 2, 3]]")
    for i, p in enumerate(prompts):
        if not p:
            raise InputError(f"prompt {i} is empty — give at least one token (e.g. the BOS id)")
        bad = [t for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise InputError(
                f"prompt {i} has token id {bad[0]!r} outside the vocabulary [0, {vocab_size}) — check the tokenizer"
            )
    return prompts


def context_budget(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> int:
    """New tokens a prompt may get: the context holds prompt + generated tokens."""
    if prompt_len > max_seq_len:
        raise InputError(
            f"prompt of {prompt_len} tokens is longer than the model's context of {max_seq_len} tokens — "
            "shorten the prompt"
        )
    return min(max_new_tokens, max_seq_len - prompt_len)


# ---- one choice in flight ----------------------------------------------------------------------------
TokenCallback = Callable[[int], "bool | None"]  # (token) -> True to end this choice now


class RowState:
    """One choice being generated: its sampler (penalty history, RNG), token budget and result so far.

    `params.stop_ids` must be resolved (a set, not None). A choice ends with reason `stop` on a stop id
    (kept in the output) or when `on_token` returns True, and with `length` when its budget is spent.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt: list[int],
        budget: int,
        vocab_size: int,
        device: torch.device | str,
        on_token: TokenCallback | None = None,
    ):
        self.params, self.budget, self.on_token = params, budget, on_token
        self.sampler = RequestSampler(params, prompt, vocab_size, device)
        want = params.logprobs is not None
        self.result = Generation([], "length", [] if want else None, [] if want else None)
        self.done = budget == 0
        self.finish_reason: str | None = "length" if self.done else None

    @property
    def tokens(self) -> list[int]:
        return self.result.tokens

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this choice's raw logits row (V,): penalties, processors, warps, draw."""
        return self.sampler.choose(self.sampler.process(logits))

    def emit(self, token: int, raw_logits: torch.Tensor | None = None) -> bool:
        """Record `token` (drawn from `raw_logits`, needed only for log-probabilities); True once done."""
        result = self.result
        result.tokens.append(token)
        self.sampler.record(token)
        if result.logprobs is not None:
            lp, top = token_logprobs(raw_logits, token, self.params.logprobs)
            result.logprobs.append(lp)
            result.top_logprobs.append(top)
        stop_now = self.on_token(token) if self.on_token is not None else None
        if token in self.params.stop_ids or stop_now:
            self.finish("stop")
        elif len(result.tokens) >= self.budget:
            self.finish("length")
        return self.done

    def finish(self, reason: str) -> None:
        self.done, self.finish_reason, self.result.finish_reason = True, reason, reason


def row_seeds(seed: int | None, n_rows: int) -> list[int | None]:
    """Row r of a flattened (prompt, choice) batch draws with `seed + r` (all None without a seed)."""
    return [None if seed is None else seed + r for r in range(n_rows)]


def expand_choices(prompts: Sequence[list[int]], n: int) -> list[list[int]]:
    """Each prompt repeated n times, prompt-major: row b·n + i is choice i of prompt b."""
    return [p for p in prompts for _ in range(n)]
