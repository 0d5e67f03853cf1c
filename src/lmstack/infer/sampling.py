"""Turning logits into the next token: penalties, temperature, top-k, top-p, min-p, then greedy or a draw.

Each transform is a pure function of a (B, V) logits tensor, testable against its formula alone. The
order follows `transformers` (penalties, then temperature, then the truncation filters):

- repetition penalty (Keskar et al. 2019, CTRL): a logit of a token already in the prompt or the
  output is divided by the penalty when positive and multiplied by it when negative;
- frequency and presence penalties (OpenAI's definition, over generated tokens only):
  logit -= frequency · count + presence · [count > 0];
- no-repeat n-gram: a token that would complete an n-gram already in the sequence is banned;
- temperature T (seed 001, Equation 4): softmax(z / T); T = 0 means greedy (argmax);
- top-k keeps the k largest logits; top-p (nucleus, Holtzman et al. 2020) keeps the smallest set of
  most likely tokens whose probability sums to at least p; min-p keeps tokens whose probability is at
  least min_p times the largest one.

Randomness comes from a `torch.Generator` per request, never the global RNG, so a request's draws do
not depend on what else runs beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.errors import InputError

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. `temperature=0` (the default) is greedy.

    `stop_ids=None` stops on the model's `eos_id`; `()` never stops early. `seed` seeds the request's
    own generator. `logprobs` asks for that many top alternatives' log-probabilities per token (0 gives
    just the chosen token's), taken from the raw model distribution before any transform.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    stop_ids: tuple[int, ...] | None = None
    seed: int | None = None
    logprobs: int | None = None
    # (ids_so_far, logits (V,)) -> logits (V,), applied after the penalties and before temperature;
    # ids_so_far are the generated tokens only. Constrained decoding (JSON mode) plugs in here.
    logits_processors: tuple = ()

    def __post_init__(self) -> None:
        if self.stop_ids is not None:
            object.__setattr__(self, "stop_ids", tuple(int(t) for t in self.stop_ids))
        check_sampling(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            logprobs=self.logprobs,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_history(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
            or self.no_repeat_ngram_size > 0
            or bool(self.logits_processors)
        )


def check_sampling(
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    repetition_penalty: float,
    no_repeat_ngram_size: int,
    logprobs: int | None,
) -> None:
    """Validate decoding arguments where they enter; messages name the problem and the fix."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r} — use e.g. 64")
    if not temperature >= 0:  # also catches NaN
        raise InputError(
            f"temperature must be >= 0, got {temperature} — use 0 for greedy or e.g. 0.8 to sample"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise InputError(
            f"top_k must be a positive integer or None, got {top_k!r} — use e.g. 50, or None to disable"
        )
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must lie in (0, 1], got {top_p} — use e.g. 0.9, or None to disable")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise InputError(f"min_p must lie in [0, 1], got {min_p} — use e.g. 0.05, or None to disable")
    if not repetition_penalty > 0:
        raise InputError(f"repetition_penalty must be > 0, got {repetition_penalty} — use 1.0 to disable")
    if no_repeat_ngram_size < 0:
        raise InputError(f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size} — use 0 to disable")
    if logprobs is not None and logprobs < 0:
        raise InputError(f"logprobs must be >= 0 or None, got {logprobs} — use e.g. 5")


# ---- pure transforms ---------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty on tokens where `seen` (B, V) is True: z / p if z > 0 else z · p."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence(
    logits: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float
) -> torch.Tensor:
    """logit -= frequency · count + presence · [count > 0], with `counts` (B, V) of generated tokens."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def banned_ngram_tokens(tokens: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of `tokens` if appended (the last n-1 tokens as prefix)."""
    if n <= 0 or len(tokens) < n:
        return []
    prefix = tuple(tokens[len(tokens) - n + 1 :]) if n > 1 else ()
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix]


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature in (0.0, 1.0) else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), the rest -> -inf."""
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus: keep the most likely tokens until their probability reaches p (always at least one)."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Keep tokens with probability >= min_p · (largest probability) (Nguyen et al. 2024)."""
    if min_p is None or min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.amax(-1, keepdim=True)
    return logits.masked_fill(probs < threshold, NEG_INF)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature then the truncation filters; greedy requests are left untouched (argmax is unchanged)."""
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from a single row of processed logits (V,): argmax, or a draw from softmax."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float(), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A request's own RNG; without a seed it is seeded from the global RNG (reproducible under torch.manual_seed)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,))))
    return generator


# ---- per-request state -------------------------------------------------------------------------
class RequestSampler:
    """The history a request's penalties need, its generator, and the processing of its logits row."""

    def __init__(
        self, params: SamplingParams, prompt: list[int], vocab_size: int, device: torch.device | str = "cpu"
    ):
        self.params = params
        self.tokens = list(prompt)  # prompt + generated, for no-repeat n-grams
        self.n_prompt = len(prompt)
        self.generator = make_generator(params.seed, device) if not params.greedy else None
        self.seen = self.counts = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt:
                self.seen[torch.tensor(prompt, device=device)] = True
        if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            self.counts = torch.zeros(vocab_size, dtype=torch.long, device=device)

    def process(self, logits: torch.Tensor, history: list[int] | None = None) -> torch.Tensor:
        """Penalised and warped logits (V,) for this request (`history` overrides the stored tokens)."""
        p = self.params
        if not p.needs_history and p.greedy:
            return logits
        z = logits
        if p.needs_history:
            tokens = self.tokens if history is None else history
            seen, counts = self.seen, self.counts
            if history is not None and (seen is not None or counts is not None):
                seen, counts = self._history_tensors(history, logits)
            if seen is not None:
                z = apply_repetition_penalty(z[None], seen[None], p.repetition_penalty)[0]
            if counts is not None:
                z = apply_frequency_presence(z[None], counts[None], p.frequency_penalty, p.presence_penalty)[
                    0
                ]
            if p.no_repeat_ngram_size:
                banned = banned_ngram_tokens(tokens, p.no_repeat_ngram_size)
                if banned:
                    z = z.clone()
                    z[banned] = NEG_INF
            generated = tokens[self.n_prompt :]
            for processor in p.logits_processors:
                z = processor(generated, z)
        return warp(z[None], p)[0]

    def _history_tensors(self, history: list[int], logits: torch.Tensor):
        # speculative verification asks about positions past the stored tokens: rebuild from `history`
        seen = counts = None
        ids = torch.tensor(history, dtype=torch.long, device=logits.device)
        if self.seen is not None:
            seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            seen[ids] = True
        if self.counts is not None:
            counts = torch.bincount(ids[self.n_prompt :], minlength=logits.shape[-1])
        return seen, counts

    def choose(self, processed: torch.Tensor) -> int:
        return choose(processed, self.params, self.generator)

    def record(self, token: int) -> None:
        self.tokens.append(token)
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1


def token_logprobs(
    raw_logits: torch.Tensor, token: int, top: int | None
) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of `token` under the raw model distribution, and the `top` most likely alternatives."""
    logp = torch.log_softmax(raw_logits.float(), dim=-1)
    alternatives: list[tuple[int, float]] = []
    if top:
        values, ids = torch.topk(logp, min(top, logp.shape[-1]))
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return float(logp[token]), alternatives
