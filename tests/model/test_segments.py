"""Packed rows: several documents in one sequence with `segments` (a document mask) and positions
restarting at each. Every attention implementation must give each document exactly the logits (and
gradients) it gets alone, and a model without segments must not change."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmstack import ModelConfig, build_model
from lmstack.errors import InputError

CONFIG = ModelConfig(
    vocab_size=89, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64, family="llama",
)  # fmt: skip
LENGTHS = (5, 9, 3)  # three documents in one row of 20 (3 padding slots)
ROW = 20


def _model(config: ModelConfig, impl: str) -> torch.nn.Module:
    model = build_model(config, seed=0, dtype=torch.float64, attn_impl=impl)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    return model


def _docs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 89, (n,), generator=g) for n in LENGTHS]


def _packed(docs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = torch.zeros(1, ROW, dtype=torch.long)
    positions = torch.zeros(1, ROW, dtype=torch.long)
    segments = torch.full((1, ROW), -1, dtype=torch.long)
    start = 0
    for s, doc in enumerate(docs):
        ids[0, start : start + len(doc)] = doc
        positions[0, start : start + len(doc)] = torch.arange(len(doc))
        segments[0, start : start + len(doc)] = s
        start += len(doc)
    return {"ids": ids, "positions": positions, "segments": segments, "mask": segments >= 0}


@pytest.mark.parametrize("impl", ["eager", "sdpa", "flash"])
@pytest.mark.parametrize("window", [None, 4])
def test_packed_documents_equal_each_alone(impl, window):
    model = _model(dataclasses.replace(CONFIG, sliding_window=window), impl)
    docs = _docs()
    batch = _packed(docs)
    logits = model(
        batch["ids"], positions=batch["positions"], attention_mask=batch["mask"], segments=batch["segments"]
    )
    # the gradient of the packed row's documents (padding left out), compared with the sum over documents
    logits[batch["mask"]].sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    start, total = 0, 0
    for doc in docs:
        alone = model(doc[None])
        torch.testing.assert_close(logits[:, start : start + len(doc)], alone, rtol=0, atol=1e-10)
        total = total + alone.sum()
        start += len(doc)
    total.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=0, atol=1e-9, msg=name)
    # without segments, the later documents see the earlier ones: the mask is what makes them equal
    mixed = model(batch["ids"], positions=batch["positions"], attention_mask=batch["mask"])
    assert (mixed[:, LENGTHS[0] : sum(LENGTHS)] - logits[:, LENGTHS[0] : sum(LENGTHS)]).abs().max() > 1e-2


def test_segments_are_refused_with_a_cache_or_a_wrong_shape():
    model = _model(CONFIG, "sdpa")
    ids = torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(InputError, match="segments"):
        model(ids, segments=torch.zeros(1, 5, dtype=torch.long))
