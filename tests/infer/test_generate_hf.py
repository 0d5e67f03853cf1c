"""Greedy and beam search give exactly the tokens of `transformers` `generate` on the same weights."""

from __future__ import annotations

import pytest
import torch

from lmstack.infer import CACHE_KINDS, Beam, generate

from .conftest import HF_FAMILIES, VOCAB  # noqa: F401  (importlib mode resolves the package-relative import)


def _batch(seed: int = 0, lengths=(7, 20, 13)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _hf_generate(hf, prompts, **kwargs):
    """Left-pad like `generate` does and return each row's new tokens, cut after the first EOS."""
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = torch.tensor(p), 1
    out = hf.generate(ids, attention_mask=mask, pad_token_id=0, **kwargs)[:, T:].tolist()
    eos = hf.generation_config.eos_token_id
    rows = []
    for row in out:
        rows.append(row[: row.index(eos) + 1] if eos is not None and eos in row else row)
    return rows


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_greedy_matches_transformers_for_every_cache(hf_pair, family):
    hf, ours = hf_pair(family)
    prompts = _batch()
    ref = _hf_generate(hf, prompts, max_new_tokens=24, do_sample=False)
    assert len({t for row in ref for t in row}) > 8  # the greedy paths vary
    kinds = [k for k in CACHE_KINDS if k != "rolling" or ours.config.sliding_window]
    for kind in kinds:
        assert generate(ours, prompts, max_new_tokens=24, cache=kind, stop_ids=()) == ref, kind


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_stops_on_eos_like_transformers(hf_pair, family):
    _, plain = hf_pair(family)
    free_run = generate(plain, _batch(1), max_new_tokens=16, stop_ids=())
    eos = free_run[0][5]  # a token the first row emits mid-way
    hf, ours = hf_pair(family, eos_id=eos)
    prompts = _batch(1)
    ref = _hf_generate(hf, prompts, max_new_tokens=16, do_sample=False)
    got = generate(ours, prompts, max_new_tokens=16, details=True)  # default stop: config.eos_id
    assert [g.tokens for g in got] == ref
    assert got[0].tokens[-1] == eos and got[0].finish_reason == "stop"
    assert all(g.finish_reason == ("stop" if g.tokens[-1] == eos else "length") for g in got)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_penalties_and_no_repeat_ngram_match_transformers(hf_pair, family):
    hf, ours = hf_pair(family)
    prompts = _batch(2)
    kwargs = dict(max_new_tokens=20, repetition_penalty=1.3, no_repeat_ngram_size=2)
    ref = _hf_generate(hf, prompts, do_sample=False, **kwargs)
    assert generate(ours, prompts, stop_ids=(), **kwargs) == ref


BEAM_CASES = [
    ("llama", 3, 1.0, False),
    ("llama", 4, 2.0, "never"),
    ("gpt2", 2, 1.0, True),
    ("mistral", 3, 0.0, False),
    ("qwen2", 4, -1.0, True),
]


@pytest.mark.parametrize(("family", "num_beams", "length_penalty", "early_stopping"), BEAM_CASES)
def test_beam_search_matches_transformers(hf_pair, family, num_beams, length_penalty, early_stopping):
    _, plain = hf_pair(family)
    prompts = _batch(3, lengths=(5, 9))
    # an EOS the beams meet now and then, so finished hypotheses and length penalties matter
    eos = generate(plain, prompts[:1], max_new_tokens=8, stop_ids=())[0][3]
    hf, ours = hf_pair(family, eos_id=eos)
    for prompt in prompts:
        kwargs = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
        ref = _hf_generate(hf, [prompt], max_new_tokens=12, do_sample=False, **kwargs)
        got = generate(ours, [prompt], max_new_tokens=12, strategy=Beam(**kwargs))
        assert got == ref, (prompt, got, ref)


def test_beam_search_with_no_repeat_ngram_matches_transformers(hf_pair):
    hf, ours = hf_pair("llama")
    prompt = _batch(4, lengths=(6,))
    kwargs = dict(max_new_tokens=14, no_repeat_ngram_size=2, repetition_penalty=1.2)
    assert generate(ours, prompt, stop_ids=(), strategy=Beam(3), **kwargs) == _hf_generate(
        hf, prompt, do_sample=False, num_beams=3, **kwargs
    )
