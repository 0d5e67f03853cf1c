"""GGUF block formats against the `gguf` package: quantisers bit-equal where it has one (Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1), every dequantiser equal to its decoder. The `gguf` package has no K-quant encoder,
so Q4_K/Q5_K/Q6_K bytes are checked by decoding them with `gguf` and by their error against the
input; tests/interop/test_gguf.py compares them with llama.cpp's own quantiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmstack.errors import InputError
from lmstack.quant import GGML_BLOCKS, ggml_dequantize, ggml_quantize

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

T = gguf.GGMLQuantizationType


def _weights(rows: int = 24, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.2
    w[1, :64] = 0  # all-zero blocks
    w[2] = w[2].abs()  # all-positive blocks (the min is clamped to zero in K-quants)
    w[3, 5] = 3.0  # an outlier
    w[4, :32] = 0.5  # a constant block
    return w


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "F32", "BF16"])
def test_quantize_bit_equal_to_gguf(qtype):
    w = _weights()
    ours = ggml_quantize(w, qtype).numpy()
    ref = quantize(w.numpy(), T[qtype])
    assert np.array_equal(ours, ref.view(np.uint8).reshape(ours.shape))


@pytest.mark.parametrize("qtype", list(GGML_BLOCKS))
def test_dequantize_equal_to_gguf(qtype):
    w = _weights(seed=1)
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        data = ggml_quantize(w, qtype).numpy()
    else:
        data = quantize(w.numpy(), T[qtype]).view(np.uint8)
    ref = dequantize(data, T[qtype])
    ours = ggml_dequantize(torch.from_numpy(data.copy()), qtype, tuple(w.shape))
    assert np.array_equal(ours.numpy(), ref.reshape(w.shape))


@pytest.mark.parametrize(
    ("qtype", "rel_rmse"), [("Q4_K", 0.12), ("Q5_K", 0.06), ("Q6_K", 0.03), ("Q8_0", 0.01)]
)
def test_k_quant_error(qtype, rel_rmse):
    w = _weights(rows=32, seed=2)
    deq = ggml_dequantize(ggml_quantize(w, qtype), qtype, tuple(w.shape))
    assert ((deq - w).pow(2).mean().sqrt() / w.std()) < rel_rmse
    assert torch.equal(deq[1, :64], torch.zeros(64))
    # the K-quant search beats plain min/max rounding at the same bits (Q4_K vs Q4_1, Q5_K vs Q5_1)
    simple = {"Q4_K": "Q4_1", "Q5_K": "Q5_1"}.get(qtype)
    if simple:
        plain = ggml_dequantize(ggml_quantize(w, simple), simple, tuple(w.shape))
        assert (deq - w).pow(2).mean() < (plain - w).pow(2).mean()


def test_bad_widths_and_types_name_the_fix():
    with pytest.raises(InputError, match="multiple of 256"):
        ggml_quantize(torch.zeros(2, 320), "Q4_K")
    with pytest.raises(InputError, match="not supported"):
        ggml_quantize(torch.zeros(2, 256), "Q3_K")
    with pytest.raises(InputError, match="truncated"):
        ggml_dequantize(torch.zeros(100, dtype=torch.uint8), "Q8_0", (2, 64))
