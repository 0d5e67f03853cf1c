"""The request API: SamplingParams validation, keyword overrides, n choices, logits processors, and every
strategy refusing each option it cannot honour."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lmstack.errors import InputError
from lmstack.infer import Beam, Contrastive, Engine, SamplingParams, Speculative, generate
from lmstack.infer.sampling import apply_repetition_penalty

PROMPTS = [[1, 5, 9, 22], [40, 2, 2, 7, 13]]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(n=0), r"SamplingParams\.n must be an integer >= 1, got 0 — use 1"),
        (dict(n=True), r"SamplingParams\.n must be an integer"),
        (dict(seed=1.5), r"SamplingParams\.seed must be an integer or None"),
        (dict(stop_ids=[3, -1]), r"SamplingParams\.stop_ids holds -1, not a token id"),
        (dict(stop_ids="eos"), r"SamplingParams\.stop_ids holds 'e'"),
        (
            dict(logits_processors=(abs, 3)),
            r"SamplingParams\.logits_processors holds 3, which is not callable",
        ),
        (dict(frequency_penalty=math.nan), r"SamplingParams\.frequency_penalty must be a number"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(top_k=0), "top_k must be a positive integer or None"),
        (dict(min_p=2.0), r"min_p must lie in \[0, 1\]"),
        (dict(logprobs=-1), "logprobs must be >= 0"),
    ],
)
def test_sampling_params_name_the_field_and_the_fix(fields, message):
    with pytest.raises(InputError, match=message):
        SamplingParams(**fields)


def test_stop_ids_become_a_frozenset_and_one_processor_a_tuple():
    params = SamplingParams(stop_ids=[4, 2, 4], logits_processors=abs)
    assert params.stop_ids == frozenset({2, 4}) and params.logits_processors == (abs,)
    assert SamplingParams(stop_ids=7).stop_ids == frozenset({7})
    assert SamplingParams().stop_ids is None


def test_keyword_overrides_are_sampling_params_fields(make_tiny):
    model = make_tiny(seed=3)
    base = SamplingParams(max_new_tokens=20, temperature=0.8, seed=3, stop_ids=())
    assert generate(model, PROMPTS, base, max_new_tokens=6) == generate(
        model, PROMPTS, max_new_tokens=6, temperature=0.8, seed=3, stop_ids=()
    )
    assert [len(t) for t in generate(model, PROMPTS, base)] == [20, 20]
    with pytest.raises(
        InputError, match="unknown generation option.*temprature.*valid SamplingParams fields: max_new"
    ):
        generate(model, PROMPTS, temprature=0.5)
    with pytest.raises(InputError, match=r"strategy must be Beam\(...\), Contrastive\(...\) or Speculative"):
        generate(model, PROMPTS, strategy="beam")
    with pytest.raises(InputError, match=r"speculate_k now goes in strategy=Speculative\(draft, k\)"):
        generate(model, PROMPTS, speculate_k=3)


def test_n_choices_equal_single_runs_seeded_seed_plus_row(make_tiny):
    model = make_tiny(seed=3)
    out = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, n=3, seed=10, stop_ids=(), details=True)
    assert len(out) == 6  # prompt-major: entry b*3 + i is choice i of prompt b
    for b, prompt in enumerate(PROMPTS):
        for i in range(3):
            alone = generate(
                model, [prompt], max_new_tokens=8, temperature=1.0, seed=10 + 3 * b + i, stop_ids=()
            )
            assert out[3 * b + i].tokens == alone[0]
    assert len({tuple(o.tokens) for o in out[:3]}) == 3  # the choices really differ
    # a single prompt: choice i is the prompt generated alone with seed + i
    one = generate(model, PROMPTS[1], max_new_tokens=8, temperature=1.0, n=2, seed=5, stop_ids=())
    assert one == [
        generate(model, PROMPTS[1], max_new_tokens=8, temperature=1.0, seed=5 + i)[0] for i in range(2)
    ]


def test_speculative_n_choices_are_independent_seeded_runs(make_tiny):
    target, draft = make_tiny(seed=1), make_tiny(seed=2, n_layers=1)
    kwargs = dict(max_new_tokens=10, temperature=0.9, stop_ids=(), strategy=Speculative(draft, k=3))
    both = generate(target, [PROMPTS[0]], n=2, seed=7, **kwargs)
    assert both == [generate(target, [PROMPTS[0]], seed=7 + i, **kwargs)[0] for i in range(2)]
    assert both[0] != both[1]


# ---- logits processors ---------------------------------------------------------------------------------
class OnlyEven:
    """A constrained-decoding stand-in: only even ids are allowed; records the ids and logits it saw."""

    def __init__(self):
        self.calls: list[list[int]] = []
        self.logits: list[torch.Tensor] = []

    def __call__(self, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.calls.append(list(ids))
        self.logits.append(logits.clone())
        odd = torch.arange(logits.shape[-1], device=logits.device) % 2 == 1
        return logits.masked_fill(odd, float("-inf"))


def _reference_constrained_greedy(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1]
            logits[1::2] = float("-inf")
            seq.append(int(logits.argmax()))
    return seq[len(prompt) :]


def test_logits_processors_see_the_generated_ids_and_constrain_every_path(make_tiny):
    model = make_tiny(seed=4)
    proc = OnlyEven()
    got = generate(model, [PROMPTS[0]], max_new_tokens=7, stop_ids=(), logits_processors=(proc,))[0]
    assert got == _reference_constrained_greedy(model, PROMPTS[0], 7)
    assert got != generate(model, [PROMPTS[0]], max_new_tokens=7, stop_ids=())[0]  # it did change something
    assert proc.calls == [got[:i] for i in range(7)]  # generated ids so far, prompt excluded

    draft = make_tiny(seed=5, n_layers=1)
    sampled = SamplingParams(
        max_new_tokens=9, temperature=0.9, seed=2, stop_ids=(), logits_processors=(OnlyEven(),)
    )
    plain = generate(model, PROMPTS, sampled)
    engine = Engine(model, max_batch=2, kv_blocks=32, block_size=4)
    requests = [dataclasses.replace(sampled, seed=2 + i) for i in range(2)]  # seeded like generate's rows
    assert [g.tokens for g in engine.run(PROMPTS, requests)] == plain  # the Engine honours processors
    greedy = dict(max_new_tokens=7, stop_ids=(), logits_processors=(OnlyEven(),))
    assert generate(model, [PROMPTS[0]], strategy=Speculative(draft, 3), **greedy)[0] == got
    for strategy in (Beam(3), Contrastive(0.5, 3), Speculative(draft, 2)):
        for tokens in generate(model, PROMPTS, strategy=strategy, **greedy):
            assert tokens and all(t % 2 == 0 for t in tokens), strategy
    for tokens in plain:
        assert all(t % 2 == 0 for t in tokens)


def test_logits_processors_run_after_penalties_and_before_temperature(make_tiny):
    model = make_tiny(seed=4)
    proc = OnlyEven()
    generate(model, [PROMPTS[1]], max_new_tokens=1, temperature=0.5, repetition_penalty=1.3, seed=0,
             logits_processors=(proc,))  # fmt: skip
    with torch.no_grad():
        raw = model(torch.tensor([PROMPTS[1]]))[0, -1]
    seen = torch.zeros(raw.shape[-1], dtype=torch.bool)
    seen[PROMPTS[1]] = True
    expected = apply_repetition_penalty(raw[None], seen[None], 1.3)[0]
    assert torch.allclose(proc.logits[0], expected)  # penalised, not yet divided by the temperature


# ---- strategies refuse what they cannot honour ---------------------------------------------------------
def _strategies(make_tiny):
    return {
        "beam": Beam(2),
        "contrastive": Contrastive(0.5, 3),
        "speculative": Speculative(make_tiny(seed=2, n_layers=1)),
        "speculative-other-vocab": Speculative(make_tiny(vocab=60, seed=2)),
    }


REFUSALS = [
    ("beam", dict(temperature=0.7), "beam search is deterministic here, got temperature=0.7"),
    ("beam", dict(top_k=5), "beam search does not sample, so top_k has no effect"),
    ("beam", dict(top_p=0.9), "beam search does not sample, so top_p has no effect"),
    ("beam", dict(min_p=0.1), "beam search does not sample, so min_p has no effect"),
    ("beam", dict(n=2), "beam search returns one best hypothesis, got n=2"),
    ("beam", dict(logprobs=2), "beam search does not report logprobs"),
    ("beam", dict(cache="paged"), "beam search reorders cache rows"),
    ("contrastive", dict(temperature=0.7), "contrastive search is deterministic, got temperature=0.7"),
    ("contrastive", dict(top_k=5), r"candidates from Contrastive.top_k — leave top_k=None"),
    ("contrastive", dict(top_p=0.9), "contrastive search does not sample, so top_p has no effect"),
    ("contrastive", dict(min_p=0.1), "contrastive search does not sample, so min_p has no effect"),
    ("contrastive", dict(n=2), "n=2 choices would be identical"),
    ("contrastive", dict(cache="paged"), "contrastive search reorders cache rows"),
    (
        "speculative-other-vocab",
        dict(),
        r"the draft's vocabulary \(60 ids\) differs from the target's \(61\)",
    ),
]


@pytest.mark.parametrize(("strategy", "options", "message"), REFUSALS)
def test_every_strategy_refuses_what_it_cannot_honour(make_tiny, strategy, options, message):
    model = make_tiny(seed=1)
    with pytest.raises(InputError, match=message):
        generate(model, PROMPTS, max_new_tokens=4, strategy=_strategies(make_tiny)[strategy], **options)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda d: Beam(0), r"Beam.num_beams must be an integer >= 1, got 0"),
        (lambda d: Beam(2, length_penalty=math.inf), "Beam.length_penalty must be a finite number"),
        (lambda d: Beam(2, early_stopping="soon"), "Beam.early_stopping must be True, False or 'never'"),
        (lambda d: Contrastive(1.5, 4), r"Contrastive.penalty_alpha must lie in \[0, 1\]"),
        (lambda d: Contrastive(0.5, 1), "contrastive search needs top_k >= 2 candidates"),
        (lambda d: Speculative(d, k=0), "Speculative.k must be an integer >= 1"),
        (lambda d: Speculative("draft.pt"), "Speculative.draft must be an lmstack model"),
    ],
)
def test_strategies_validate_themselves(make_tiny, build, message):
    with pytest.raises(InputError, match=message):
        build(make_tiny(seed=2))


def test_engine_refuses_n_choices_and_stops_at_any_stop_id(make_tiny):
    model = make_tiny(seed=3)
    engine = Engine(model, max_batch=2, kv_blocks=32, block_size=4)
    with pytest.raises(
        InputError, match=r"one choice per request, got n=3 — submit 3 requests, choice i with seed=seed \+ i"
    ):
        engine.submit(PROMPTS[0], SamplingParams(n=3))
    free = generate(model, [PROMPTS[0]], max_new_tokens=12, stop_ids=())[0]
    firsts = [i for i, t in enumerate(free) if t not in free[:i]]  # first occurrences
    early, late = firsts[2], firsts[-1]
    out = engine.run([PROMPTS[0]], SamplingParams(max_new_tokens=12, stop_ids={free[late], free[early]}))[0]
    assert out.tokens == free[: early + 1] and out.finish_reason == "stop"
