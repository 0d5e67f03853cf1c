"""Integer weight-only quantisation of a matrix `w` of shape (out, in).

int8, per output channel, symmetric:
    scale[o] = max_i |w[o, i]| / 127,   q[o, i] = round(w[o, i] / scale[o]) in [-127, 127]
    w ≈ q * scale;  |w - q * scale| <= scale / 2 (round to nearest), zero stays exactly zero.

int4, group-wise, asymmetric: each row is cut into groups of `group_size` consecutive inputs; a group
with range [lo, hi] (widened to hold 0, so zero is exact) gets
    scale = (hi - lo) / 15 rounded up to a bfloat16 value,   zero = round(-lo / scale) in [0, 15],
    q = clamp(round(w / scale) + zero, 0, 15),   w ≈ (q - zero) * scale;   |w - (q - zero) * scale| <= scale / 2.
Two 4-bit codes share a byte, the even input in the low nibble. Small groups track local ranges
(the GPTQ/AWQ default is 128); the cost is one scale and one zero per group. The scale is stored as
float32 but holds a bfloat16 value (a step at most 2^-7 coarser), so a decode kernel reads 2 bytes
per scale and still multiplies by exactly the saved value: with groups of 32, scales as float32
would be a fifth of what a decode step reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.errors import InputError

INT4_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Int8Tensor:
    q: torch.Tensor  # (out, in) int8
    scale: torch.Tensor  # (out,) float32


@dataclass(frozen=True)
class Int4Tensor:
    packed: torch.Tensor  # (out, in // 2) uint8, even input in the low nibble
    scale: torch.Tensor  # (out, in // group_size) float32
    zero: torch.Tensor  # (out, in // group_size) uint8 in [0, 15]
    group_size: int
    shape: tuple[int, int]


def _matrix(w: torch.Tensor, what: str) -> torch.Tensor:
    if w.dim() != 2:
        raise InputError(
            f"{what} takes a 2-D weight (out, in), got shape {tuple(w.shape)} — pass a Linear's weight"
        )
    return w.detach().float()


def int8_quantize(w: torch.Tensor) -> Int8Tensor:
    """Symmetric int8 with one scale per output channel (row)."""
    w = _matrix(w, "int8_quantize")
    scale = w.abs().amax(dim=1) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round(w * inv[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Tensor(q, scale)


def int8_dequantize(t: Int8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (t.q.float() * t.scale[:, None]).to(dtype)


def int4_quantize(w: torch.Tensor, group_size: int = 128) -> Int4Tensor:
    """Asymmetric 4-bit codes with one (scale, zero) per group of `group_size` inputs."""
    w = _matrix(w, "int4_quantize")
    out_features, in_features = w.shape
    if group_size not in INT4_GROUP_SIZES:
        raise InputError(f"int4 group size {group_size} is not supported — use one of {INT4_GROUP_SIZES}")
    if in_features % group_size:
        fits = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
        fix = f"use group size {fits[-1]}" if fits else "pad the input width to a multiple of 32"
        raise InputError(
            f"int4 group size {group_size} does not divide the input width {in_features} — {fix}"
        )
    groups = w.reshape(out_features, in_features // group_size, group_size)
    lo = groups.amin(dim=-1).clamp(max=0)
    hi = groups.amax(dim=-1).clamp(min=0)
    scale = bfloat16_ceil((hi - lo) / 15)
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    zero = torch.round(-lo * inv).clamp(0, 15)
    q = (torch.round(groups * inv[..., None]) + zero[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.reshape(out_features, in_features)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return Int4Tensor(packed, scale, zero.to(torch.uint8), group_size, (out_features, in_features))


def bfloat16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 values rounded up to the nearest bfloat16 value (its top 16 bits), as
    float32: a scale rounded up still covers its group's range, and a kernel may store it in 2 bytes
    exactly."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """(rows, n // 2) bytes -> (rows, n) codes, low nibble first."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def int4_dequantize(t: Int4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out_features, in_features = t.shape
    q = int4_unpack(t.packed).reshape(out_features, -1, t.group_size).float()
    w = (q - t.zero[..., None].float()) * t.scale[..., None]
    return w.reshape(out_features, in_features).to(dtype)
