"""int8 per-channel and int4 group-wise quantisation against their formulas' error bounds."""

from __future__ import annotations

import pytest
import torch

from lmstack.errors import InputError
from lmstack.quant import int4_dequantize, int4_quantize, int8_dequantize, int8_quantize
from lmstack.quant.integer import int4_unpack


def _weights(rows: int = 48, cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.2
    w[3] = 0  # an all-zero row must not divide by zero
    w[5, 7] = 4.0  # an outlier widens one channel's scale only
    return w


def test_int8_error_within_half_a_step_per_channel():
    w = _weights()
    q = int8_quantize(w)
    assert q.q.dtype == torch.int8 and q.scale.shape == (w.shape[0],)
    assert torch.equal(q.scale, w.abs().amax(1) / 127)
    err = (int8_dequantize(q) - w).abs()
    assert (err <= q.scale[:, None] / 2 * (1 + 1e-6) + 1e-12).all()
    assert (err[5] > 0).any() and err[3].max() == 0
    # the channel's largest weight is exactly representable (code ±127)
    assert q.q.abs().amax(1)[torch.arange(48) != 3].eq(127).all()


def test_int8_rejects_non_matrix():
    with pytest.raises(InputError, match="2-D"):
        int8_quantize(torch.zeros(4))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_within_half_a_step_per_group(group_size):
    w = _weights(cols=384)
    q = int4_quantize(w, group_size)
    assert q.packed.shape == (48, 192) and q.scale.shape == (48, 384 // group_size)
    codes = int4_unpack(q.packed)
    assert codes.max() <= 15
    deq = int4_dequantize(q)
    step = q.scale.repeat_interleave(group_size, dim=1)
    assert ((deq - w).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    # each group uses its full code range (its min and max map to the ends, up to the zero's rounding)
    assert (codes.reshape(48, -1, group_size).amax(-1) >= 14)[torch.arange(48) != 3].all()
    assert torch.equal(deq[3], torch.zeros(384))  # zero is exact


def test_int4_smaller_groups_are_more_accurate():
    w = _weights(cols=512)
    errors = [(int4_dequantize(int4_quantize(w, g)) - w).pow(2).mean() for g in (32, 64, 128)]
    assert errors[0] < errors[1] < errors[2]


def test_int4_group_that_does_not_divide_the_width_names_the_fix():
    with pytest.raises(InputError, match=r"does not divide the input width 96 — use group size 32"):
        int4_quantize(torch.zeros(4, 96), 64)
    with pytest.raises(InputError, match="not supported"):
        int4_quantize(torch.zeros(4, 96), 48)
