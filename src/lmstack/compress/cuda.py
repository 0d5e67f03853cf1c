"""PyTorch's int4 weight-only CUDA kernel for a `QuantLinear`, checked against the reference on first use.

`torch.ops.aten._weight_int4pack_mm` (the tinygemm kernel gpt-fast uses) multiplies bfloat16
activations by int4 codes in its own tiled layout, built by `_convert_weight_to_int4pack` from the
codes two a byte, the even input in the high nibble (ours keep it in the low one), with
`innerKTiles` of 2, 4 or 8 (the input width a multiple of 16 times it). Like PyTorch's CPU kernel it
computes w = (q − 8)·s + m with a float offset m per group, stored with the scales as
(in/g, out, 2): ours, w = (q − z)·s, is the same with m = (8 − z)·s (`int4_scales_and_zeros`).

Nothing here can be run without a GPU, and a layout mistake would give wrong numbers silently; so
`checked_pack` packs a layer, multiplies a small probe through the kernel and through
dequantise-then-multiply, and returns the packed weight only when they agree within `TOLERANCE`
(relative to the reference's norm: bfloat16 rounding of the activations and scales moves it by
~2^-9; a scrambled layout by ~1). On any exception or a larger difference it warns once, naming the
reason, and the layer keeps multiplying by its dequantised matrix.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

TOLERANCE = 2**-5  # ‖kernel − reference‖ / ‖reference‖ on the probe
PROBE_ROWS = 4
INNER_K_TILES = (8, 4, 2)  # the kernel's choices, the largest that tiles the input width first


@dataclass(frozen=True)
class DeviceInt4:
    weight: torch.Tensor  # the kernel's tiled layout (int32)
    scales_and_zeros: torch.Tensor  # (in/g, out, 2) bfloat16: s and (8 − z)·s
    group_size: int
    out_features: int


def ops() -> tuple[Callable, Callable]:
    """PyTorch's CUDA int4 ops (pack, matmul); one place, so a test can stand in for them."""
    return torch.ops.aten._convert_weight_to_int4pack, torch.ops.aten._weight_int4pack_mm


def int4_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(out, in/g) scales and integer zeros -> PyTorch's (in/g, out, 2) bfloat16 [s, m] with
    (q − z)·s = (q − 8)·s + m, m = (8 − z)·s: exact in float32, rounded once to bfloat16."""
    s = scales.float()
    offset = (8 - zeros.float()) * s
    return torch.stack([s.t(), offset.t()], dim=-1).to(torch.bfloat16).contiguous()


def int4_to_cuda_layout(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> DeviceInt4:
    """Our int4 (codes two a byte, even input low) in the CUDA kernel's layout."""
    k = packed.shape[1] * 2
    tiles = next((t for t in INNER_K_TILES if k % (16 * t) == 0), None)
    if tiles is None:
        raise ValueError(f"input width {k} is not a multiple of 32")
    swapped = ((packed & 0x0F) << 4) | (packed >> 4)  # even input in the high nibble
    pack, _ = ops()
    weight = pack(swapped.contiguous(), tiles)
    return DeviceInt4(weight, int4_scales_and_zeros(scales, zeros), group_size, packed.shape[0])


def int4_matmul(x: torch.Tensor, p: DeviceInt4) -> torch.Tensor:
    """x (..., K) @ Wᵀ with bfloat16 activations, in x's dtype, shape (..., N)."""
    _, mm = ops()
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    y = mm(rows, p.weight, p.group_size, p.scales_and_zeros)
    return y.to(x.dtype).reshape(*x.shape[:-1], p.out_features)


def checked_pack(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    reference: Callable[[torch.Tensor], torch.Tensor],
) -> DeviceInt4 | None:
    """The layer packed for the kernel if, on a probe, the kernel agrees with `reference` (float32
    dequantise-then-multiply, without bias); else None, after one warning that says why."""
    try:
        p = int4_to_cuda_layout(packed, scales, zeros, group_size)
        generator = torch.Generator(device=packed.device).manual_seed(0)
        probe = torch.randn(PROBE_ROWS, packed.shape[1] * 2, generator=generator, device=packed.device).to(
            torch.bfloat16
        )  # values a bfloat16 holds, so both sides multiply the same input
        got, want = int4_matmul(probe, p).float(), reference(probe.float()).float()
        error = float((got - want).norm() / want.norm().clamp_min(1e-30))
        if not torch.isfinite(got).all() or not error <= TOLERANCE:
            reason = (
                f"differs from dequantise-then-multiply by {error:.3g} of its norm (allowed {TOLERANCE:g})"
            )
        else:
            return p
    except Exception as exc:  # any failure of the kernel (an unsupported GPU, shape or build)
        reason = f"failed ({type(exc).__name__}: {exc})"
    warnings.warn(
        f"lmstack: PyTorch's CUDA int4 kernel {reason}; this layer multiplies by its dequantised matrix instead",
        RuntimeWarning,
        stacklevel=3,
    )
    return None
