"""Beam search with the semantics of `transformers` (the vectorised `_beam_search` of v4.50+ / v5).

Keep `num_beams` running hypotheses scored by their summed log-probabilities. Each step scores every
(beam, token) continuation and keeps the top 2·num_beams (more with several stop ids) so that, even if
the best ones end, num_beams can go on. A candidate that ends (a stop id, or the length limit) among
the top num_beams becomes a finished hypothesis scored

    sum of log-probabilities / (generated length including the stop token) ** length_penalty

so `length_penalty > 0` favours longer outputs and `< 0` shorter ones; the best num_beams finished
hypotheses are kept. Search stops when no running beam can still beat the worst finished one:
with `early_stopping=False` (the default) the best running score is judged at the current length,
with `"never"` (and a positive length penalty) at the maximum length, and with `True` search stops as
soon as num_beams hypotheses have finished. Log-probabilities are computed in float32 from the logits,
as `transformers` does; penalties and the no-repeat-n-gram ban apply to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmstack.errors import InputError
from lmstack.infer.cache import make_cache
from lmstack.infer.request import RowState
from lmstack.infer.sampling import RequestSampler, SamplingParams

BIG = 1.0e9  # the "impossible" score offset used by transformers


@dataclass(frozen=True)
class Beam:
    """Beam search strategy for `generate(..., strategy=Beam(4))`.

    Honours max_new_tokens, stop_ids, the penalties, no_repeat_ngram_size and logits_processors (applied
    to each beam's log-probabilities). Refuses what a deterministic search cannot mean: temperature > 0
    and the sampling filters, n > 1 (the beams are not independent choices), logprobs, and the paged
    cache (beams reorder cache rows).
    """

    num_beams: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise InputError(f"Beam.num_beams must be an integer >= 1, got {self.num_beams!r} — e.g. 4")
        if (
            isinstance(self.length_penalty, bool)
            or not isinstance(self.length_penalty, (int, float))
            or (not math.isfinite(self.length_penalty))
        ):
            raise InputError(
                f"Beam.length_penalty must be a finite number, got {self.length_penalty!r} — e.g. 1.0"
            )
        if self.early_stopping not in (True, False, "never"):
            raise InputError(
                f"Beam.early_stopping must be True, False or 'never', got {self.early_stopping!r}"
            )

    def check(self, model: torch.nn.Module, params: SamplingParams, cache: str) -> None:
        if not params.greedy:
            raise InputError(
                f"beam search is deterministic here, got temperature={params.temperature} — use temperature=0"
            )
        for name in ("top_k", "top_p", "min_p"):
            if getattr(params, name) is not None:
                raise InputError(f"beam search does not sample, so {name} has no effect — leave {name}=None")
        if params.n > 1:
            raise InputError(
                f"beam search returns one best hypothesis, got n={params.n} — use n=1 (or sampling for n choices)"
            )
        if params.logprobs is not None:
            raise InputError("beam search does not report logprobs — use logprobs=None, or no strategy")
        if cache == "paged":
            raise InputError(
                "beam search reorders cache rows — use cache='static', 'hybrid', 'dynamic' or 'rolling'"
            )

    def decode(self, model: torch.nn.Module, prompt: list[int], row: RowState, cache: str) -> None:
        beam_search(model, prompt, self, row, cache=cache)


def beam_search(
    model: torch.nn.Module, prompt: list[int], beam: Beam, row: RowState, *, cache: str = "static"
) -> None:
    """The best finished hypothesis for one prompt into `row`; `stats['score']` is its length-penalised score."""
    config = model.config
    params, max_new_tokens = row.params, row.budget
    num_beams, length_penalty, early_stopping = beam.num_beams, beam.length_penalty, beam.early_stopping
    device, dtype = model.device, model.dtype
    stop_ids = torch.tensor(sorted(params.stop_ids), dtype=torch.long, device=device)
    keep = max(2, 1 + len(params.stop_ids)) * num_beams
    top_mask = torch.arange(keep, device=device) < num_beams  # only the top num_beams may finish
    P = len(prompt)

    kv = make_cache(cache, config, 1, P + max_new_tokens, dtype=dtype, device=device)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    logits = model.head(model.features(ids, cache=kv)[:, -1])  # (1, V)
    kv.reorder(
        torch.zeros(num_beams, dtype=torch.long, device=device)
    )  # (num_beams, ...) copies of the prompt
    logits = logits.expand(num_beams, -1)

    samplers = [RequestSampler(params, prompt, config.vocab_size, device) for _ in range(num_beams)]
    running = torch.zeros(num_beams, max_new_tokens, dtype=torch.long, device=device)
    running_scores = torch.full((num_beams,), -BIG, device=device)
    running_scores[0] = 0.0  # only the first beam is live at the start, so beams do not duplicate
    finished = running.clone()
    finished_len = torch.zeros(num_beams, dtype=torch.long, device=device)
    finished_scores = torch.full((num_beams,), -BIG, device=device)
    is_finished = torch.zeros(num_beams, dtype=torch.bool, device=device)
    improvable = True

    for t in range(max_new_tokens):
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (beams, V)
        if params.needs_history:
            log_probs = torch.stack([s.process(row) for s, row in zip(samplers, log_probs)])
        V = log_probs.shape[-1]
        total = (log_probs + running_scores[:, None]).reshape(-1)  # (beams * V)
        top_scores, top_index = torch.topk(total, keep)
        source, token = top_index // V, top_index % V
        candidates = running[source].clone()  # (keep, max_new)
        candidates[:, t] = token
        ends = torch.isin(token, stop_ids) | (t + 1 >= max_new_tokens)

        # running beams for the next step: the best candidates that did not end
        live_scores = top_scores - BIG * ends.float()
        nxt = torch.topk(live_scores, num_beams).indices
        running, running_scores, beam_source = candidates[nxt], live_scores[nxt], source[nxt]

        # finished hypotheses: merge the candidates that just ended with the kept ones
        just_finished = ends & top_mask
        scores = top_scores / float(t + 1) ** length_penalty
        if early_stopping is True and bool(is_finished.all()):
            scores = scores - BIG
        if not improvable:
            scores = scores - BIG
        scores = scores - BIG * (~just_finished).float()
        merged_scores = torch.cat((finished_scores, scores))
        best = torch.topk(merged_scores, num_beams).indices
        finished = torch.cat((finished, candidates))[best]
        finished_len = torch.cat((finished_len, torch.full((keep,), t + 1, device=device)))[best]
        is_finished = torch.cat((is_finished, just_finished))[best]
        finished_scores = merged_scores[best]

        # can a running beam still beat the worst finished hypothesis?
        if early_stopping == "never" and length_penalty > 0.0:
            best_length = max_new_tokens
        else:
            best_length = t + 1
        best_running = running_scores[0] / float(best_length) ** length_penalty
        worst_finished = torch.where(is_finished, finished_scores.min(), torch.tensor(-BIG, device=device))
        improvable = improvable and bool((best_running > worst_finished).any())
        all_done = early_stopping is True and bool(is_finished.all())
        if not improvable or all_done or bool(ends.all()) or t + 1 >= max_new_tokens:
            break

        source_list = beam_source.tolist()
        samplers = [_fork(samplers[s]) for s in source_list]
        for s, tok in zip(samplers, running[:, t].tolist()):
            s.record(tok)
        kv.reorder(beam_source)
        positions = torch.full((num_beams, 1), P + t, dtype=torch.long, device=device)
        logits = model(running[:, t : t + 1], positions=positions, cache=kv)[:, -1]

    n = int(finished_len[0])
    row.result.stats["score"] = float(finished_scores[0])
    for token in finished[0, :n].tolist():
        if row.emit(token):
            break


def _fork(sampler: RequestSampler) -> RequestSampler:
    """Copy a beam's penalty history (beams that share a parent must not share state)."""
    twin = object.__new__(RequestSampler)
    twin.__dict__.update(sampler.__dict__)
    twin.tokens = list(sampler.tokens)
    twin.seen = None if sampler.seen is None else sampler.seen.clone()
    twin.counts = None if sampler.counts is None else sampler.counts.clone()
    return twin
