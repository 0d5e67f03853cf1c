"""Contrastive search against a plain, cache-free reference implementation written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmstack.infer import Contrastive, generate


def reference_contrastive(model, prompt, k, alpha, n):
    """Su et al. 2022, recomputing everything from scratch at every step (no cache, no batching)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            context = model.features(torch.tensor([seq]))[0]  # (L, d)
            probs = torch.softmax(model.head(context[-1]).float(), -1)
            top_probs, top_ids = torch.topk(probs, k)
            scores = []
            for p, v in zip(top_probs.tolist(), top_ids.tolist()):
                h = model.features(torch.tensor([seq + [v]]))[0, -1]
                similarity = max(float(F.cosine_similarity(h, c, dim=0)) for c in context)
                scores.append((1 - alpha) * p - alpha * similarity)
            seq.append(top_ids[scores.index(max(scores))].item())
    return seq[len(prompt) :]


@pytest.mark.parametrize(
    ("alpha", "k", "cache"), [(0.6, 4, "static"), (0.3, 3, "dynamic"), (0.8, 5, "hybrid")]
)
def test_contrastive_matches_reference(make_tiny, alpha, k, cache):
    model = make_tiny(seed=5)
    prompts = [[3, 17, 42, 8, 8, 19], [5, 1]]
    got = generate(
        model, prompts, max_new_tokens=12, strategy=Contrastive(alpha, k), cache=cache, stop_ids=()
    )
    for prompt, out in zip(prompts, got):
        assert out == reference_contrastive(model, prompt, k, alpha, 12)


def test_contrastive_with_zero_alpha_is_greedy_and_differs_otherwise(make_tiny):
    model = make_tiny(seed=5)
    prompt = [[3, 17, 42, 8, 8, 19]]
    greedy = generate(model, prompt, max_new_tokens=16, stop_ids=())
    assert generate(model, prompt, max_new_tokens=16, strategy=Contrastive(0.0, 4), stop_ids=()) == greedy
    assert generate(model, prompt, max_new_tokens=16, strategy=Contrastive(0.6, 4), stop_ids=()) != greedy


def test_contrastive_on_a_sliding_window_model_with_rolling_cache(make_tiny):
    model = make_tiny(seed=6, sliding_window=5)
    prompt = [4, 9, 33, 2, 50, 7, 7, 12]
    got = generate(
        model, [prompt], max_new_tokens=10, strategy=Contrastive(0.5, 3), cache="rolling", stop_ids=()
    )
    assert got[0] == reference_contrastive(model, prompt, 3, 0.5, 10)
