"""Continuous batching over a paged KV cache (Yu et al. 2022, Orca;
Kwon et al. 2023, vLLM).

Static batching runs a batch until its longest member ends, so short requests leave their rows idle.
Here scheduling happens at every iteration (`step`): finished requests leave the batch at once, and
waiting requests are prefilled from a FIFO queue into the free rows. Keys and values live in a
`PagedCache`, so memory follows the tokens actually held, a block at a time. When a running sequence
needs a block and none is free, the most recently admitted sequence is preempted: its blocks are
freed and it goes back to the front of the queue, to be recomputed (prompt + tokens so far, one
prefill) when blocks free up — never dropped. Each request samples with its own generator, so its
output does not depend on what else shares the batch. Requests are `SamplingParams`, one choice each,
with every option `generate` honours (penalties, logits processors, a set of stop ids, logprobs).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from lmstack.errors import InputError
from lmstack.infer.cache import PagedCache
from lmstack.infer.request import (
    Generation,
    RowState,
    TokenEvent,
    context_budget,
    default_stop_ids,
    normalise_prompts,
)
from lmstack.infer.sampling import SamplingParams

__all__ = ["Engine", "TokenEvent"]


@dataclass
class _Request:
    id: int
    prompt: list[int]
    row: RowState
    preemptions: int = 0

    @property
    def generated(self) -> list[int]:
        return self.row.tokens


class Engine:
    """`Engine(model, max_batch=8, kv_blocks=256, block_size=16)`; `submit` requests, call `step` (or `run`)."""

    def __init__(
        self, model: torch.nn.Module, *, max_batch: int = 8, kv_blocks: int = 256, block_size: int = 16
    ):
        for name, value in (("max_batch", max_batch), ("kv_blocks", kv_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        self.model, self.config = model, model.config
        self.device = model.device
        self.max_batch, self.block_size = max_batch, block_size
        self.cache = PagedCache(self.config, kv_blocks, block_size, dtype=model.dtype, device=self.device)
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self._requests: dict[int, _Request] = {}
        self._events: list[TokenEvent] = []  # produced outside step (cancel), delivered by the next step
        self._next_id = 0
        self.stats = {"steps": 0, "preemptions": 0, "peak_blocks": 0, "prefill_tokens": 0, "decode_tokens": 0}

    # ---- requests ----------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a request (one choice); returns its id. `params.stop_ids=None` stops at any of the model's
        EOS ids. Raises InputError for a bad prompt, for `n > 1` (submit each choice as its own request
        with `seed + i`, as `generate` seeds choice i), or if the request could never fit the block pool."""
        if params is not None and not isinstance(params, SamplingParams):
            raise InputError(
                f"params must be a SamplingParams, got {type(params).__name__} — build SamplingParams(...)"
            )
        params = default_stop_ids(params or SamplingParams(), self.config)
        if params.n != 1:
            raise InputError(
                f"Engine.submit takes one choice per request, got n={params.n} — submit {params.n} requests, "
                "choice i with seed=seed + i (what generate does for n choices)"
            )
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise InputError("the prompt is empty — give at least one token (e.g. the BOS id)")
        prompt = normalise_prompts([prompt_ids], self.config.vocab_size)[0]
        budget = context_budget(len(prompt), params.max_new_tokens, self.config.max_seq_len)
        need = math.ceil((len(prompt) + budget) / self.block_size)
        if need > self.cache.allocator.n_blocks:
            raise InputError(
                f"a request of {len(prompt)} prompt + {budget} new tokens needs {need} KV blocks of "
                f"{self.block_size}, the pool has {self.cache.allocator.n_blocks} — raise kv_blocks"
            )
        row = RowState(params, prompt, budget, self.config.vocab_size, self.device)
        request = _Request(self._next_id, prompt, row)
        self._next_id += 1
        self._requests[request.id] = request
        self.waiting.append(request)
        return request.id

    def cancel(self, request_id: int) -> bool:
        """Stop a request now and free its blocks; False if it is unknown or already finished."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.cache.free(request_id)
        self._events.append(TokenEvent(request_id, None, None, True, "cancelled"))
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._events)

    # ---- one iteration -------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Admit and prefill waiting requests, then decode one token for every running request."""
        events, self._events = self._events, []
        self._admit(events)
        self._make_room()
        if self.running:
            batch = list(self.running)
            ids = [r.id for r in batch]
            tokens = torch.tensor([[r.generated[-1]] for r in batch], dtype=torch.long, device=self.device)
            positions = torch.tensor(
                [[self.cache.lengths[i]] for i in ids], dtype=torch.long, device=self.device
            )
            logits = self.model(tokens, positions=positions, cache=self.cache.bind(ids))[:, -1]
            self.stats["decode_tokens"] += len(batch)
            for row, (request, token) in enumerate(zip(batch, self._choose(batch, logits))):
                events.append(self._emit(request, token, logits[row]))
        self.stats["steps"] += 1
        self.stats["peak_blocks"] = max(self.stats["peak_blocks"], self.cache.blocks_in_use)
        return events

    def _admit(self, events: list[TokenEvent]) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            request = self.waiting[0]
            if request.row.done:  # the prompt fills the context already
                self.waiting.popleft()
                self._requests.pop(request.id, None)
                events.append(TokenEvent(request.id, None, None, True, "length"))
                continue
            resumed = bool(request.generated)
            tokens = request.prompt + request.generated[:-1] if resumed else request.prompt
            self.cache.add(request.id)
            if not self.cache.reserve(request.id, len(tokens) + 1):  # + room for its first decode step
                self.cache.free(request.id)
                break  # FIFO: wait for blocks rather than let later requests overtake
            self.waiting.popleft()
            self.running.append(request)
            self.stats["prefill_tokens"] += len(tokens)
            ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
            hidden = self.model.features(ids, cache=self.cache.bind([request.id]))
            if not resumed:  # the prefill's last position gives the first new token
                logits = self.model.head(hidden[:, -1])
                events.append(self._emit(request, self._choose([request], logits)[0], logits[0]))

    def _make_room(self) -> None:
        """Give every running sequence a slot for one more token, preempting the newest when blocks run out."""
        i = 0
        while i < len(self.running):
            request = self.running[i]
            if self.cache.reserve(request.id, 1):
                i += 1
                continue
            victim = self.running.pop()  # the most recently admitted (possibly `request` itself)
            self.cache.free(victim.id)
            victim.preemptions += 1
            self.stats["preemptions"] += 1
            self.waiting.appendleft(victim)

    def _choose(self, batch: list[_Request], logits: torch.Tensor) -> list[int]:
        if all(r.row.params.greedy and not r.row.params.needs_history for r in batch):
            return logits.argmax(-1).tolist()
        return [r.row.choose(row) for r, row in zip(batch, logits)]

    def _emit(self, request: _Request, token: int, raw_logits: torch.Tensor) -> TokenEvent:
        row = request.row
        if row.emit(token, raw_logits):
            self.running.remove(request)
            self.cache.free(request.id)
            self._requests.pop(request.id, None)
        logprob, top = None, None
        if row.result.logprobs is not None:
            logprob, top = row.result.logprobs[-1], row.result.top_logprobs[-1]
        return TokenEvent(request.id, token, logprob, row.done, row.finish_reason, top)

    # ---- conveniences --------------------------------------------------------------------------
    def stream(self) -> Iterator[TokenEvent]:
        """Step until every submitted request has finished, yielding events as they come."""
        while self.has_work():
            yield from self.step()

    def run(
        self,
        prompts: Iterable[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Generation]:
        """Submit `prompts` (with one SamplingParams for all, or one each) and run them to completion."""
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        ids = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        results = {i: Generation([], "length") for i in ids}
        for event in self.stream():
            result = results.get(event.request_id)
            if result is None:
                continue
            if event.token is not None:
                result.tokens.append(event.token)
                if event.logprob is not None:
                    result.logprobs = (result.logprobs or []) + [event.logprob]
                    result.top_logprobs = (result.top_logprobs or []) + [event.top_logprobs or []]
            if event.finished:
                result.finish_reason = event.finish_reason
        return [results[i] for i in ids]
