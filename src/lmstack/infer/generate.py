"""`generate`: prompts in, new token ids out — greedy, sampling, beam, contrastive or speculative decoding.

One path with pluggable caches and samplers (DESIGN.md rule 14). Batches of mixed-length prompts are
left-padded: every row's last prompt token sits in the last column, so one forward per step serves
all rows; the attention mask marks the padding and positions count from each row's first real token
(`masks.positions_from_padding`), exactly what `transformers` does. The prompt is prefilled in one
forward pass and only its last position goes through the LM head.

A sequence ends when it emits a stop id (finish reason `stop`, the id is part of the output), reaches
`max_new_tokens`, or fills the model's context (`max_seq_len` = prompt + generated; reason `length`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from lmstack.errors import InputError
from lmstack.infer.cache import CACHE_KINDS, make_cache
from lmstack.infer.sampling import RequestSampler, SamplingParams, token_logprobs
from lmstack.model.masks import positions_from_padding
from lmstack.tokenizer.chat import render_text

OnToken = Callable[[int, int], "bool | None"]  # (row, token) -> True to stop that row now


@dataclass
class Generation:
    """What one prompt produced. Log-probabilities come from the raw model distribution (softmax of the
    logits before penalties, temperature or filters), so they describe the model, not the sampler."""

    tokens: list[int]
    finish_reason: str  # "stop" (a stop id or stop string) or "length" (max_new_tokens or the context)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    stats: dict = field(default_factory=dict)  # e.g. speculative acceptance rate, beam score
    text: str | None = None  # filled by generate_text


def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]] | torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    stop_ids: Sequence[int] | None = None,
    seed: int | Sequence[int] | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    no_repeat_ngram_size: int = 0,
    penalty_alpha: float | None = None,
    draft: torch.nn.Module | None = None,
    speculate_k: int = 4,
    cache: str = "static",
    logprobs: int | None = None,
    details: bool = False,
    on_token: OnToken | None = None,
    draft_tokenizer_hash: str | None = None,
    tokenizer_hash: str | None = None,
) -> list[list[int]] | list[Generation]:
    """Generate up to `max_new_tokens` new tokens for each prompt; returns the new ids, one list per prompt.

    `prompt_ids` is a list of token-id lists (mixed lengths are left-padded) or a (B, T) tensor.
    `temperature=0` (the default, as in `transformers`) is greedy; otherwise tokens are drawn after
    penalties, temperature, top-k, top-p and min-p (see sampling.py). `stop_ids=None` stops on the
    model config's `eos_id`. `seed` seeds row i's own generator with `seed + i` (or give one seed per
    row), so a row's draws do not depend on the rest of the batch.

    Strategies: `num_beams > 1` is beam search (beam.py, `transformers` semantics for `length_penalty`
    and `early_stopping`); `penalty_alpha` with `top_k` is contrastive search (contrastive.py); `draft`
    is speculative decoding with `speculate_k` proposals per step (speculative.py; the draft must share
    the target's tokenizer). These three run one prompt at a time.

    `cache` is one of dynamic, static (default), hybrid, rolling (sliding-window models), paged.
    `details=True` returns `Generation` objects (finish reason, statistics, and with `logprobs=n` the
    chosen tokens' log-probabilities and the n most likely alternatives). `on_token(row, token)` is
    called for every new token (streaming); returning True ends that row with finish reason `stop`.
    """
    config = model.config
    prompts = _normalise_prompts(prompt_ids, config.vocab_size)
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        stop_ids=_default_stop_ids(stop_ids, config),
        logprobs=logprobs,
    )
    if cache not in CACHE_KINDS:
        raise InputError(f"unknown cache {cache!r} — use one of {', '.join(CACHE_KINDS)}")
    if cache == "rolling" and config.sliding_window is None:
        raise InputError(
            "cache='rolling' needs a sliding-window model (config.sliding_window) — use 'static'"
        )
    budgets = [context_budget(len(p), max_new_tokens, config.max_seq_len) for p in prompts]
    seeds = _row_seeds(seed, len(prompts))
    rows = [replace(params, seed=s) for s in seeds]
    strategy = _check_strategy(num_beams, penalty_alpha, top_k, draft, speculate_k, params, cache)

    with torch.inference_mode():
        if strategy == "sample":
            results = decode_batch(model, prompts, rows, budgets, cache=cache, on_token=on_token)
        else:
            if strategy == "speculative":
                from lmstack.infer.speculative import check_same_tokenizer

                check_same_tokenizer(model, draft, tokenizer_hash, draft_tokenizer_hash)
            options = dict(
                num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                top_k=top_k, penalty_alpha=penalty_alpha, draft=draft, speculate_k=speculate_k,
            )  # fmt: skip
            results = []
            for i, (prompt, row_params, budget) in enumerate(zip(prompts, rows, budgets)):
                callback = None if on_token is None else (lambda tok, _i=i: on_token(_i, tok))
                results.append(
                    _one_prompt(strategy, model, prompt, row_params, budget, cache, callback, options)
                )
    return results if details else [r.tokens for r in results]


def _one_prompt(strategy, model, prompt, params, budget, cache, on_token, options) -> Generation:
    """Beam, contrastive or speculative decoding of one prompt (these strategies do not batch prompts)."""
    if budget == 0:
        return Generation([], "length")
    if strategy == "beam":
        from lmstack.infer.beam import beam_search

        return beam_search(
            model,
            prompt,
            num_beams=options["num_beams"],
            max_new_tokens=budget,
            length_penalty=options["length_penalty"],
            early_stopping=options["early_stopping"],
            params=params,
            cache=cache,
            on_token=on_token,
        )
    if strategy == "contrastive":
        from lmstack.infer.contrastive import contrastive_search

        return contrastive_search(
            model,
            prompt,
            top_k=options["top_k"],
            penalty_alpha=options["penalty_alpha"],
            max_new_tokens=budget,
            params=params,
            cache=cache,
            on_token=on_token,
        )
    from lmstack.infer.speculative import speculative_generate

    return speculative_generate(
        model,
        options["draft"],
        prompt,
        k=options["speculate_k"],
        max_new_tokens=budget,
        params=params,
        cache=cache,
        on_token=on_token,
    )


# ---- the batched sampling loop ---------------------------------------------------------------------
def decode_batch(
    model: torch.nn.Module,
    prompts: list[list[int]],
    params: list[SamplingParams],
    budgets: list[int],
    *,
    cache: str = "static",
    on_token: OnToken | None = None,
) -> list[Generation]:
    """Greedy or sampled decoding of a left-padded batch: one prefill, then one forward per new token."""
    config = model.config
    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype
    B, lengths = len(prompts), [len(p) for p in prompts]
    T = max(lengths)
    padded = any(n < T for n in lengths)
    ids = torch.full((B, T), config.pad_id or 0, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = positions_from_padding(mask)
    kv = make_cache(cache, config, B, T + max(budgets), dtype=dtype, device=device)

    samplers = [RequestSampler(p, prompt, config.vocab_size, device) for p, prompt in zip(params, prompts)]
    fast_greedy = all(p.greedy and not p.needs_history for p in params)
    want_logprobs = [p.logprobs is not None for p in params]
    results = [Generation([], "length", [] if w else None, [] if w else None) for w in want_logprobs]
    done = [b == 0 for b in budgets]

    hidden = model.features(ids, positions=positions, cache=kv, attention_mask=mask if padded else None)
    logits = model.head(hidden[:, -1])  # (B, V): only the last position needs the LM head
    next_pos = positions[:, -1:] + 1  # (B, 1)
    while not all(done):
        if fast_greedy:
            chosen = logits.argmax(-1).tolist()
        else:
            chosen = [0 if done[i] else samplers[i].choose(samplers[i].process(logits[i])) for i in range(B)]
        for i, token in enumerate(chosen):
            if done[i]:
                continue
            result = results[i]
            result.tokens.append(token)
            samplers[i].record(token)
            if want_logprobs[i]:
                lp, top = token_logprobs(logits[i], token, params[i].logprobs)
                result.logprobs.append(lp)
                result.top_logprobs.append(top)
            stop_now = on_token(i, token) if on_token is not None else None
            if token in params[i].stop_ids or stop_now:
                done[i], result.finish_reason = True, "stop"
            elif len(result.tokens) >= budgets[i]:
                done[i] = True
        if all(done):
            break
        step_ids = torch.tensor(chosen, dtype=torch.long, device=device)[:, None]
        logits = model(step_ids, positions=next_pos, cache=kv)[:, -1]
        next_pos = next_pos + 1
    return results


# ---- text in, text out ---------------------------------------------------------------------------------
Messages = list[dict]


def render_chat(tokenizer, messages: Messages, *, add_generation_prompt: bool = True) -> tuple[str, bool]:
    """A conversation as prompt text (`lmstack.tokenizer.chat.render_text`), and whether the tokenizer's
    chat template made it (True) or the plain "User: ... / Assistant:" transcript did (False)."""
    text = render_text(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return text, bool(tokenizer.chat_template)


def generate_text(
    model: torch.nn.Module,
    tokenizer,
    prompts: str | Messages | Sequence[str] | Sequence[Messages],
    *,
    max_new_tokens: int = 128,
    stop: str | Sequence[str] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    details: bool = False,
    **kwargs,
) -> str | list[str] | list[Generation]:
    """`generate` on text: encode, decode, stop strings and chat templates.

    A prompt is a string, or a conversation (a list of {"role", "content"} dicts) rendered with the
    tokenizer's chat template (`render_chat`; without one, a plain transcript that stops at the next
    "\nUser:"). Generation also stops at any of the `stop` strings, which are cut from the text, and at
    the tokenizer's EOS. `on_text(row, piece)` streams text as it becomes final (text that could be
    the start of a stop string is held back). A single prompt returns a string, a list returns a list;
    `details=True` returns `Generation` objects with `.text`. Other keywords go to `generate`.
    """
    single = isinstance(prompts, str) or (
        isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)
    )
    batch = [prompts] if single else list(prompts)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise InputError("stop strings must be non-empty")
    ids, row_stops = [], []
    for prompt in batch:
        extra = []
        if isinstance(prompt, str):
            tokens = tokenizer.encode_ordinary(prompt)
            bos = getattr(tokenizer, "bos_id", None)
            tokens = ([bos] if bos is not None else []) + tokens
        else:
            text, templated = render_chat(tokenizer, list(prompt))
            tokens = tokenizer.encode(text, allowed_special="all")
            extra = [] if templated else ["\nUser:"]
        ids.append(tokens)
        row_stops.append(stops + extra)
    stop_ids = kwargs.pop("stop_ids", None)
    if stop_ids is None:
        stop_ids = {t for t in (model.config.eos_id, getattr(tokenizer, "eos_id", None)) if t is not None}
    decoders = [_StopStringWatcher(tokenizer, s, i, on_text) for i, s in enumerate(row_stops)]

    def on_token(row: int, token: int) -> bool:
        return decoders[row].push(token, token in stop_ids)

    results = generate(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        stop_ids=sorted(stop_ids),
        on_token=on_token,
        details=True,
        **kwargs,
    )
    for result, watcher in zip(results, decoders):
        result.text = watcher.finish()
        if watcher.stopped:
            result.finish_reason = "stop"
    if details:
        return results
    texts = [r.text for r in results]
    return texts[0] if single else texts


class _StopStringWatcher:
    """Incremental detokenisation of one row with stop-string detection and safe streaming."""

    def __init__(self, tokenizer, stops: list[str], row: int, on_text):
        self.decoder, self.stops, self.row, self.on_text = tokenizer.stream_decoder(), stops, row, on_text
        self.text, self.emitted, self.stopped, self.cut = "", 0, False, None
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, token: int, is_stop_id: bool) -> bool:
        if self.stopped:
            return True
        if not is_stop_id:  # an EOS id ends the text; its own string is not part of it
            self.text += self.decoder.push(token)
        found = [i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.stops) if i >= 0]
        if found:
            self.cut, self.stopped = min(found), True
            self._emit(self.cut)
            return True
        self._emit(len(self.text) - self.hold)
        return False

    def _emit(self, upto: int) -> None:
        if self.on_text is not None and upto > self.emitted:
            self.on_text(self.row, self.text[self.emitted : upto])
        self.emitted = max(self.emitted, upto)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.decoder.flush()
            self.cut = len(self.text)
            self._emit(self.cut)
        return self.text[: self.cut]


# ---- validation helpers -----------------------------------------------------------------------------
def context_budget(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> int:
    """New tokens a prompt may get: the context holds prompt + generated tokens."""
    if prompt_len > max_seq_len:
        raise InputError(
            f"prompt of {prompt_len} tokens is longer than the model's context of {max_seq_len} tokens — "
            "shorten the prompt"
        )
    return min(max_new_tokens, max_seq_len - prompt_len)


def _normalise_prompts(prompt_ids, vocab_size: int) -> list[list[int]]:
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


def _default_stop_ids(stop_ids: Sequence[int] | None, config) -> tuple[int, ...]:
    if stop_ids is None:
        return () if config.eos_id is None else (config.eos_id,)
    if isinstance(stop_ids, int):
        return (stop_ids,)
    return tuple(stop_ids)


def _row_seeds(seed: int | Sequence[int] | None, n: int) -> list[int | None]:
    if seed is None:
        return [None] * n
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = list(seed)
    if len(seeds) != n:
        raise InputError(f"got {len(seeds)} seeds for {n} prompts — give one seed, or one per prompt")
    return seeds


def _check_strategy(
    num_beams, penalty_alpha, top_k, draft, speculate_k, params: SamplingParams, cache: str
) -> str:
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise InputError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    chosen = [
        name
        for name, on in (
            ("beam", num_beams > 1),
            ("contrastive", penalty_alpha is not None),
            ("speculative", draft is not None),
        )
        if on
    ]
    if len(chosen) > 1:
        raise InputError(f"choose one decoding strategy, got {' and '.join(chosen)} — drop all but one")
    if num_beams > 1:
        if not params.greedy:
            raise InputError("beam search is deterministic here — use temperature=0 with num_beams > 1")
        if cache == "paged":
            raise InputError(
                "beam search reorders cache rows — use cache='static', 'hybrid', 'dynamic' or 'rolling'"
            )
        return "beam"
    if penalty_alpha is not None:
        if not 0.0 <= penalty_alpha <= 1.0 or math.isnan(penalty_alpha):
            raise InputError(f"penalty_alpha must lie in [0, 1], got {penalty_alpha} — e.g. 0.6")
        if top_k is None or top_k < 2:
            raise InputError(
                "contrastive search needs top_k >= 2 candidates — e.g. top_k=4 with penalty_alpha=0.6"
            )
        if cache == "paged":
            raise InputError(
                "contrastive search reorders cache rows — use cache='static', 'hybrid', 'dynamic' or 'rolling'"
            )
        return "contrastive"
    if draft is not None:
        if isinstance(speculate_k, bool) or not isinstance(speculate_k, int) or speculate_k < 1:
            raise InputError(f"speculate_k must be an integer >= 1, got {speculate_k!r} — e.g. 4")
        return "speculative"
    return "sample"
