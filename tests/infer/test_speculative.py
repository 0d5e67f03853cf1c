"""Speculative decoding: greedy output identical to the target; sampled output follows the target's distribution
exactly (every random path enumerated on a tiny vocabulary) and statistically (chi-square, alpha = 1e-3)."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmstack.infer import SamplingParams, Speculative, generate
from lmstack.infer.request import RowState
from lmstack.infer.speculative import speculative_generate


def _draft_of(target, make_tiny, noise: float, seed: int = 11, **overrides):
    """A draft that agrees with the target often but not always: the target's weights plus noise."""
    draft = make_tiny(vocab=target.config.vocab_size, seed=seed, **overrides)
    if not overrides:
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for p, q in zip(draft.parameters(), target.parameters()):
                p.copy_(q + noise * torch.randn(q.shape, generator=g, dtype=q.dtype))
    return draft


@pytest.mark.parametrize(
    ("k", "cache", "penalty"),
    [(1, "static", 1.0), (3, "dynamic", 1.0), (5, "hybrid", 1.0), (4, "paged", 1.0), (3, "static", 1.3)],
)
def test_greedy_speculative_is_identical_to_target(make_tiny, k, cache, penalty):
    # with a repetition penalty each verified row's choice depends on the tokens accepted before it
    target = make_tiny(seed=1)
    draft = _draft_of(target, make_tiny, noise=0.08)
    prompts = [[1, 5, 9, 22], [40, 2, 2, 7, 13, 8, 30]]
    plain = generate(target, prompts, max_new_tokens=25, stop_ids=(), repetition_penalty=penalty)
    got = generate(
        target, prompts, max_new_tokens=25, stop_ids=(), strategy=Speculative(draft, k), cache=cache, details=True,
        repetition_penalty=penalty,
    )  # fmt: skip
    assert [g.tokens for g in got] == plain
    rates = [g.stats["acceptance_rate"] for g in got]
    assert all(0.0 < r < 1.0 for r in rates), rates  # some proposals accepted, some rejected
    assert all(g.stats["target_calls"] < 25 for g in got)


def test_greedy_speculative_with_sliding_window_and_rolling_cache(make_tiny):
    target = make_tiny(seed=2, sliding_window=6)
    draft = _draft_of(target, make_tiny, noise=0.05)
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]
    plain = generate(target, prompt, max_new_tokens=30, stop_ids=())
    assert (
        generate(target, prompt, max_new_tokens=30, stop_ids=(), strategy=Speculative(draft), cache="rolling")
        == plain
    )


def test_greedy_speculative_with_an_unrelated_draft_and_stop_id(make_tiny):
    target = make_tiny(seed=3)
    draft = make_tiny(
        seed=4, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1
    )  # same vocabulary, other weights
    plain = generate(target, [[7, 7, 8]], max_new_tokens=20, stop_ids=())[0]
    stop = plain[9]
    expected = plain[: plain.index(stop) + 1]
    got = generate(
        target, [[7, 7, 8]], max_new_tokens=20, stop_ids=[stop], strategy=Speculative(draft, 3), details=True
    )[0]
    assert got.tokens == expected and got.finish_reason == "stop"


# ---- exact: enumerate every random decision ----------------------------------------------------------
class EnumeratingChooser:
    """Replays a script of choices, then takes the first option of each new decision and records the rest."""

    def __init__(self, script):
        self.script, self.depth, self.prob, self.new_branches = list(script), 0, 1.0, []

    def _decide(self, options):  # options: [(value, probability)] with probability > 0
        if self.depth < len(self.script):
            value = self.script[self.depth]
        else:
            value = options[0][0]
            self.new_branches += [self.script[: self.depth] + [v] for v, _ in options[1:]]
            self.script.append(value)
        self.prob *= dict(options)[value]
        self.depth += 1
        return value

    def categorical(self, probs):
        return self._decide([(i, float(p)) for i, p in enumerate(probs.double()) if p > 0])

    def bernoulli(self, p):
        return self._decide([(v, w) for v, w in ((True, p), (False, 1.0 - p)) if w > 0])


def _target_joint(target, prompt, n, params):
    """Exact probability of every n-token continuation under the target's processed distribution."""
    from lmstack.infer.sampling import RequestSampler

    sampler = RequestSampler(params, prompt, target.config.vocab_size)
    V, joint = target.config.vocab_size, {}
    with torch.no_grad():
        for seq in itertools.product(range(V), repeat=n):
            prob = 1.0
            for i in range(n):
                logits = target(torch.tensor([prompt + list(seq[:i])]))[0, -1]
                dist = torch.softmax(sampler.process(logits).double(), -1)
                prob *= float(dist[seq[i]])
            joint[seq] = prob
    return joint


@pytest.mark.parametrize(("k", "temperature", "top_k"), [(1, 1.0, None), (2, 1.0, None), (2, 0.7, 3)])
def test_speculative_sampling_distribution_is_exactly_the_target(make_tiny, k, temperature, top_k):
    target = make_tiny(vocab=4, seed=7, std=0.6)
    draft = make_tiny(vocab=4, seed=8, std=0.6, n_layers=1)
    prompt, n = [1, 3, 0], k + 1
    params = SamplingParams(max_new_tokens=n, temperature=temperature, top_k=top_k, stop_ids=())
    outcome: dict[tuple, float] = {}
    scripts = [[]]
    with torch.no_grad():
        while scripts:
            chooser = EnumeratingChooser(scripts.pop())
            row = RowState(params, prompt, n, target.config.vocab_size, "cpu")
            out = speculative_generate(target, draft, prompt, row, k=k, chooser=chooser)
            scripts += chooser.new_branches
            outcome[tuple(out.tokens)] = outcome.get(tuple(out.tokens), 0.0) + chooser.prob
    expected = _target_joint(target, prompt, n, params)
    assert abs(sum(outcome.values()) - 1.0) < 1e-6  # the sampler works in float32
    for seq, p in expected.items():
        assert abs(outcome.get(seq, 0.0) - p) < 2e-6, (seq, outcome.get(seq), p)
    # the draft really disagrees with the target, so the rejection rule is doing the work
    with torch.no_grad():
        q = torch.softmax(draft(torch.tensor([prompt]))[0, -1], -1)
        p1 = torch.softmax(target(torch.tensor([prompt]))[0, -1], -1)
    assert float((p1 - q).abs().sum()) > 0.2


@pytest.mark.slow
def test_speculative_sampling_passes_chi_square(make_tiny):
    target = make_tiny(vocab=4, seed=7, std=0.6)
    draft = make_tiny(vocab=4, seed=8, std=0.6, n_layers=1)
    prompt, runs = [1, 3, 0], 1200
    params = SamplingParams(max_new_tokens=3, temperature=1.0, stop_ids=())
    counts: dict[tuple, int] = {}
    for seed in range(runs):  # fixed seeds: the test is deterministic
        out = generate(
            target,
            [prompt],
            max_new_tokens=3,
            temperature=1.0,
            stop_ids=(),
            seed=seed,
            strategy=Speculative(draft, k=2),
        )
        key = tuple(out[0][:2])
        counts[key] = counts.get(key, 0) + 1
    joint3 = _target_joint(target, prompt, 2, params)
    chi2 = sum((counts.get(s, 0) - runs * p) ** 2 / (runs * p) for s, p in joint3.items())
    dof = len(joint3) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(chi2 / 2.0)))
    assert p_value > 1e-3, (chi2, p_value)


def test_draft_with_a_different_tokenizer_is_refused(make_tiny):
    target = make_tiny(seed=1)
    other_vocab = make_tiny(vocab=60, seed=2)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(target, [[1, 2]], max_new_tokens=4, strategy=Speculative(other_vocab))
    same_vocab = make_tiny(seed=2)
    target.tokenizer_hash, same_vocab.tokenizer_hash = "a" * 64, "b" * 64
    with pytest.raises(ValueError, match="tokenizer"):
        generate(target, [[1, 2]], max_new_tokens=4, strategy=Speculative(same_vocab))
    same_vocab.tokenizer_hash = "a" * 64
    assert (
        len(generate(target, [[1, 2]], max_new_tokens=4, strategy=Speculative(same_vocab), stop_ids=())[0])
        == 4
    )
