"""`generate`: prompts in, new token ids out — greedy or sampled decoding, or a search strategy.

One path with pluggable caches, samplers and strategies. Batches of mixed-length prompts are
left-padded: every row's last prompt token sits in the last column, so one forward per step serves
all rows; the attention mask marks the padding and positions count from each row's first real token
(`masks.positions_from_padding`), exactly what `transformers` does. The prompt is prefilled in one
forward pass and only its last position goes through the LM head.

A choice ends when it emits a stop id (finish reason `stop`, the id is part of the output), reaches
`max_new_tokens`, or fills the model's context (`max_seq_len` = prompt + generated; reason `length`).
The bookkeeping of each choice is a `request.RowState`, shared with the strategies and the Engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol, runtime_checkable

import torch

from lmstack.errors import InputError
from lmstack.infer.cache import CACHE_KINDS, make_cache
from lmstack.infer.request import (
    Generation,
    RowState,
    context_budget,
    default_stop_ids,
    expand_choices,
    normalise_prompts,
    resolve_params,
    row_seeds,
)
from lmstack.infer.sampling import SamplingParams
from lmstack.model.masks import positions_from_padding
from lmstack.tokenizer.chat import transcript_stops

OnToken = Callable[[int, int], "bool | None"]  # (row, token) -> True to stop that row now


@runtime_checkable
class Strategy(Protocol):
    """A decoding strategy other than plain greedy/sampling (beam.Beam, contrastive.Contrastive,
    speculative.Speculative): it refuses what it cannot honour, then decodes one prompt into a RowState."""

    def check(self, model: torch.nn.Module, params: SamplingParams, cache: str) -> None: ...

    def decode(self, model: torch.nn.Module, prompt: list[int], row: RowState, cache: str) -> None: ...


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    params: SamplingParams | None = None,
    *,
    strategy: Strategy | None = None,
    cache: str = "static",
    details: bool = False,
    on_token: OnToken | None = None,
    **overrides,
) -> list[list[int]] | list[Generation]:
    """New token ids for each prompt, decoded as `params` (a SamplingParams) asks.

    `prompts` is a list of token-id lists (mixed lengths are left-padded), one flat list, or a (B, T)
    tensor. `overrides` are SamplingParams fields applied on top of `params`, so
    `generate(model, ids, max_new_tokens=8, temperature=0.8, seed=0)` needs no SamplingParams; any
    other keyword is an error. `temperature=0` (the default, as in `transformers`) is greedy; otherwise
    tokens are drawn after penalties, logits processors, temperature, top-k, top-p and min-p (see
    sampling.py). `stop_ids=None` stops at any of the model config's EOS ids.

    Output: one entry per (prompt, choice), prompt-major — with `n` choices, entry `b·n + i` is choice i
    of prompt b (B·n entries; n=1 gives one per prompt). Entry r draws from its own generator seeded
    `seed + r`, so it does not depend on the rest of the batch, and choice i of a single prompt equals
    generating that prompt alone with `seed + i`. Each entry is a list of new ids, or with
    `details=True` a `Generation` (finish reason, statistics, and with `logprobs=k` the chosen tokens'
    log-probabilities and the k most likely alternatives). `on_token(r, token)` is called for every new
    token of entry r (streaming); returning True ends that entry with finish reason `stop`.

    `strategy` is None (greedy or sampling, batched) or `Beam(...)`, `Contrastive(...)` or
    `Speculative(...)`, which decode one prompt at a time and refuse options they cannot honour.
    `cache` is one of dynamic, static (default), hybrid, rolling (sliding-window models), paged.
    """
    config = model.config
    params = default_stop_ids(resolve_params(params, overrides), config)
    prompts = normalise_prompts(prompts, config.vocab_size)
    if cache not in CACHE_KINDS:
        raise InputError(f"unknown cache {cache!r} — use one of {', '.join(CACHE_KINDS)}")
    if cache == "rolling" and config.sliding_window is None:
        raise InputError(
            "cache='rolling' needs a sliding-window model (config.sliding_window) — use 'static'"
        )
    if strategy is not None:
        if not isinstance(strategy, Strategy):
            raise InputError(
                f"strategy must be Beam(...), Contrastive(...) or Speculative(...), got {strategy!r} — "
                "or None for greedy/sampling"
            )
        strategy.check(model, params, cache)
    budgets = [context_budget(len(p), params.max_new_tokens, config.max_seq_len) for p in prompts]
    prompts, budgets = expand_choices(prompts, params.n), [b for b in budgets for _ in range(params.n)]
    device = model.device
    rows = []
    for r, (prompt, budget, seed) in enumerate(zip(prompts, budgets, row_seeds(params.seed, len(prompts)))):
        callback = None if on_token is None else (lambda tok, _r=r: on_token(_r, tok))
        rows.append(RowState(replace(params, seed=seed), prompt, budget, config.vocab_size, device, callback))

    with torch.inference_mode():
        if strategy is None:
            decode_batch(model, prompts, rows, cache=cache)
        else:
            for prompt, row in zip(prompts, rows):
                if not row.done:
                    strategy.decode(model, prompt, row, cache)
    results = [row.result for row in rows]
    return results if details else [r.tokens for r in results]


# ---- the batched sampling loop ---------------------------------------------------------------------
def decode_batch(
    model: torch.nn.Module, prompts: list[list[int]], rows: list[RowState], *, cache: str = "static"
) -> None:
    """Greedy or sampled decoding of a left-padded batch: one prefill, then one forward per new token."""
    config = model.config
    device, dtype = model.device, model.dtype
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
    kv = make_cache(cache, config, B, T + max(r.budget for r in rows), dtype=dtype, device=device)
    fast_greedy = all(r.params.greedy and not r.params.needs_history for r in rows)
    if all(r.done for r in rows):
        return

    hidden = model.features(ids, positions=positions, cache=kv, attention_mask=mask if padded else None)
    logits = model.head(hidden[:, -1])  # (B, V): only the last position needs the LM head
    next_pos = positions[:, -1:] + 1  # (B, 1)
    while True:
        if fast_greedy:
            chosen = logits.argmax(-1).tolist()
        else:
            chosen = [0 if row.done else row.choose(logits[i]) for i, row in enumerate(rows)]
        for i, (row, token) in enumerate(zip(rows, chosen)):
            if not row.done:
                row.emit(token, logits[i])
        if all(row.done for row in rows):
            break
        step_ids = torch.tensor(chosen, dtype=torch.long, device=device)[:, None]
        logits = model(step_ids, positions=next_pos, cache=kv)[:, -1]
        next_pos = next_pos + 1


# ---- text in, text out ---------------------------------------------------------------------------------
Messages = list[dict]


def generate_text(
    model: torch.nn.Module,
    tokenizer,
    prompts: str | Messages | Sequence[str] | Sequence[Messages],
    params: SamplingParams | None = None,
    *,
    stop: str | Sequence[str] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    details: bool = False,
    strategy: Strategy | None = None,
    cache: str = "static",
    **overrides,
) -> str | list[str] | list[Generation]:
    """`generate` on text: encode, decode, stop strings and chat templates.

    A prompt is a string, or a conversation (a list of {"role", "content"} dicts) rendered with the
    tokenizer's chat template (`Tokenizer.render_chat`; without one, a plain transcript that stops at the next
    "\nUser:"). Generation also stops at any of the `stop` strings, which are cut from the text, and at
    the model's and the tokenizer's EOS ids (unless `stop_ids` is given). `on_text(row, piece)` streams
    text as it becomes final (text that could be the start of a stop string is held back). `params`,
    `strategy`, `cache` and the SamplingParams `overrides` are as in `generate` (without them
    `max_new_tokens` is 128). A single prompt returns a string (a list of n with `n` choices), a list
    returns a list, prompt-major like `generate`; `details=True` returns `Generation` objects with `.text`.
    """
    if params is None:
        overrides.setdefault("max_new_tokens", 128)
    params = resolve_params(params, overrides)
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
            tokens, _ = tokenizer.render_chat(list(prompt), add_generation_prompt=True)
            extra = transcript_stops(tokenizer)
        ids.append(tokens)
        row_stops.extend([stops + extra] * params.n)
    if params.stop_ids is None:
        eos = getattr(tokenizer, "eos_id", None)
        params = replace(params, stop_ids=set(model.config.eos_ids) | ({eos} if eos is not None else set()))
    decoders = [StopStringWatcher(tokenizer, s, i, on_text) for i, s in enumerate(row_stops)]

    def on_token(row: int, token: int) -> bool:
        return decoders[row].push(token, token in params.stop_ids)

    results = generate(model, ids, params, strategy=strategy, cache=cache, details=True, on_token=on_token)
    for result, watcher in zip(results, decoders):
        result.text = watcher.finish()
        if watcher.stopped:
            result.finish_reason = "stop"
    if details:
        return results
    texts = [r.text for r in results]
    return texts[0] if single and params.n == 1 else texts


class StopStringWatcher:
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
