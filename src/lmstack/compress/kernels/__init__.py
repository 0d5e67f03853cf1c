"""Our CPU kernels for products with int8 and int4 weights (`qgemv.c`), built for batch-1 decoding.

Decoding one token reads every weight once; PyTorch's packed kernels stream int8 at about 60% of the
rate float32 GEMV reaches and need bfloat16 activations. These read a layout repacked for streaming
(blocks of 4 rows interleaved 16 bytes at a time, so a pass reads memory front to back, with software
prefetch). int8 and int4 first round the activation to int8 per 32 inputs (`quantize_activations`,
llama.cpp's Q8_0 treatment of activations), so that one VNNI instruction multiplies 64 codes: the
result is "dequantise, then multiply" applied to the rounded activation (relative error per element
≤ 1/254 of its block's largest magnitude, the order of PyTorch's bfloat16 activations). Widening
each int8 weight to float32 instead (exact) cost three instructions per 16 weights and left one core
at about 70% of the rate it reads memory. The bfloat16 head computes in float32 on exactly widened
weights: "dequantise, then multiply" up to the order of float32 additions.

`pack_int8` / `pack_int4` build that layout from a `QuantLinear`'s buffers (the on-disk format is
unchanged) and `unpack_int8` / `unpack_int4` give them back exactly, so a module can hold its weights
in one form only; `int8_matmul` / `int4_matmul` run it. `available()` is False when the library cannot be
built here (see `build.load`); callers then use PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmstack.compress.kernels.build import load
from lmstack.quant.integer import int4_unpack

ROWS = 4  # rows per interleaved block (qgemv.c's ROWS)
SUBBLOCK = 32  # int4 inputs per 16-byte step, and per int8 activation step
# weights below which a product runs on one thread: waking a second thread costs microseconds on an
# idle machine and milliseconds on a busy one, more than a product of a quarter million weights takes
PARALLEL_MIN_WEIGHTS = 1 << 18


@dataclass(frozen=True)
class PackedInt8:
    weight: torch.Tensor  # uint8 q + 128, blocks of ROWS rows interleaved by 16 inputs (padded to 32)
    scale: torch.Tensor  # (N,) float32
    out_features: int
    in_features: int


@dataclass(frozen=True)
class PackedInt4:
    weight: torch.Tensor  # uint8, blocks of ROWS rows interleaved by 32 inputs (16 bytes)
    scale: torch.Tensor  # bfloat16 per (block, group / 4, row, group % 4), groups padded to 4
    zero: torch.Tensor  # uint8, as the scales
    out_features: int
    in_features: int
    group_size: int


@dataclass(frozen=True)
class PackedBF16:
    weight: torch.Tensor  # bfloat16, the int8 layout
    out_features: int
    in_features: int


def available() -> bool:
    return load() is not None


def _interleave(rows: torch.Tensor, step: int) -> torch.Tensor:
    """(N, C) -> flat blocks of ROWS rows, `step` columns of each row at a time (rows zero-padded)."""
    n, c = rows.shape
    rows = F.pad(rows, (0, 0, 0, -n % ROWS))
    return rows.reshape(-1, ROWS, c // step, step).transpose(1, 2).contiguous().reshape(-1)


def _deinterleave(flat: torch.Tensor, n: int, c: int, step: int) -> torch.Tensor:
    """The inverse of `_interleave`: flat blocks -> (n, c)."""
    return flat.reshape(-1, c // step, ROWS, step).transpose(1, 2).reshape(-1, c)[:n]


def pack_int8(qweight: torch.Tensor, scales: torch.Tensor) -> PackedInt8:
    """Our int8 (N, K) codes and per-row scales in the kernel's layout: codes zero-padded to a
    multiple of 32 inputs, stored as q + 128 (the sign bit flipped) for VNNI's unsigned operand."""
    n, k = qweight.shape
    w = F.pad(qweight.view(torch.uint8), (0, -k % 32)) ^ 0x80
    return PackedInt8(_interleave(w, 16), scales.float().contiguous(), n, k)


def unpack_int8(p: PackedInt8) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N, K) int8 codes and float32 scales `pack_int8` was given, exactly."""
    k32 = -(-p.in_features // 32) * 32
    codes = _deinterleave(p.weight, p.out_features, k32, 16)[:, : p.in_features] ^ 0x80
    return codes.contiguous().view(torch.int8), p.scale.clone()


def pack_bf16(weight: torch.Tensor) -> PackedBF16:
    """A float (N, K) matrix rounded to bfloat16, in the int8 layout (inputs zero-padded to 16)."""
    n, k = weight.shape
    w = F.pad(weight.detach().to(torch.bfloat16), (0, -k % 16))
    return PackedBF16(_interleave(w, 16), n, k)


def pack_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> PackedInt4:
    """Our int4 (codes two a byte, even input low; w = (q − z)·s per group) in the kernel's layout:
    per 32 inputs, byte j holds input j (low nibble) and input j + 16 (high); scales in bfloat16 and
    zeros stored (block, group / 4, row, group % 4), groups zero-padded to a multiple of 4, so the
    kernel reads four groups of a block's four rows as one vector. `int4_quantize`'s scales are
    bfloat16 values, kept exactly; other float32 scales are rounded to nearest (relative change
    ≤ 2^-9, as PyTorch's own int4 kernels round them)."""
    n = packed.shape[0]
    codes = int4_unpack(packed).reshape(n, -1, 2, SUBBLOCK // 2)
    nibbles = (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(n, -1)
    pad = (0, -scales.shape[1] % 4)
    scale = _interleave(F.pad(scales.to(torch.bfloat16), pad), 4)
    zero = _interleave(F.pad(zeros.to(torch.uint8), pad), 4)
    return PackedInt4(_interleave(nibbles, SUBBLOCK // 2), scale, zero, n, 2 * nibbles.shape[1], group_size)


def unpack_int4(p: PackedInt4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our int4 form back from the kernel's: codes two a byte (N, K/2) uint8, scales (N, K/g) as
    float32 (exact where they were bfloat16 values, as `int4_quantize`'s are) and zeros (N, K/g)."""
    n, k, groups = p.out_features, p.in_features, p.in_features // p.group_size
    nibbles = _deinterleave(p.weight, n, k // 2, SUBBLOCK // 2).reshape(n, -1, SUBBLOCK // 2)
    codes = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=2).reshape(n, k)  # input j, then j + 16
    padded = -(-groups // 4) * 4
    scale = _deinterleave(p.scale, n, padded, 4)[:, :groups].float()
    zero = _deinterleave(p.zero, n, padded, 4)[:, :groups].contiguous()
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), scale, zero


def concat(
    packs: list[PackedInt8] | list[PackedInt4],
) -> tuple[PackedInt8 | PackedInt4, list[PackedInt8 | PackedInt4]]:
    """Packed matrices of one kind and input width stacked by rows (every one but the last a whole
    number of ROWS-row blocks), and each input again as a view into the stack."""
    assert all(p.out_features % ROWS == 0 for p in packs[:-1])
    fields = ["weight", "scale"] + (["zero"] if isinstance(packs[0], PackedInt4) else [])
    stacked = {f: torch.cat([getattr(p, f) for p in packs]) for f in fields}
    whole = dataclasses.replace(packs[0], **stacked, out_features=sum(p.out_features for p in packs))
    views, starts = [], dict.fromkeys(fields, 0)
    for p in packs:
        parts = {}
        for f in fields:
            n = getattr(p, f).numel()
            parts[f] = stacked[f][starts[f] : starts[f] + n]
            starts[f] += n
        views.append(dataclasses.replace(p, **parts))
    return whole, views


def _threads(out_features: int, in_features: int) -> int:
    return torch.get_num_threads() if out_features * in_features >= PARALLEL_MIN_WEIGHTS else 1


def _call_args(
    x: torch.Tensor, in_features: int, out_features: int, bias: torch.Tensor | None
) -> tuple[ctypes.CDLL, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What every product passes the library: it, x as contiguous float32 rows (M, K), the float32
    output (..., N) to fill (x's leading shape, so no reshape afterwards), and the bias as contiguous
    float32 (held by the caller across the call, so the pointer it passes stays valid). A decode step
    makes about four of these calls per layer, so the common case (float32, contiguous) does no
    conversion at all."""
    lib = load()
    assert lib is not None, "the kernels are not available here — check kernels.available() first"
    rows = x.reshape(-1, in_features)
    if rows.dtype != torch.float32 or not rows.is_contiguous():
        rows = rows.to(torch.float32).contiguous()
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.float32)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    return lib, rows, y, bias


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def int8_matmul(x: torch.Tensor, p: PackedInt8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """quantize_activations(x) (..., K) @ Wᵀ (+ bias) in float32, shape (..., N)."""
    lib, rows, y, b = _call_args(x, p.in_features, p.out_features, bias)
    lib.lm_int8q8_gemm(
        rows.data_ptr(), rows.shape[0], p.in_features, p.weight.data_ptr(), p.scale.data_ptr(), _ptr(b),
        y.data_ptr(), p.out_features, _threads(p.out_features, p.in_features),
    )  # fmt: skip
    return y


def bf16_matmul(x: torch.Tensor, p: PackedBF16, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ Wᵀ (+ bias) in float32 with W's bfloat16 values, shape (..., N)."""
    lib, rows, y, b = _call_args(x, p.in_features, p.out_features, bias)
    lib.lm_bf16_gemm(
        rows.data_ptr(), rows.shape[0], p.in_features, p.weight.data_ptr(), _ptr(b), y.data_ptr(),
        p.out_features, _threads(p.out_features, p.in_features),
    )  # fmt: skip
    return y


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """The activations int8_matmul and int4_matmul multiply by: x rounded to int8 per 32 inputs
    (step amax/127; a last partial block as if zero-padded), as float32 values (the same operations
    as the kernel, so the same values)."""
    k = x.shape[-1]
    blocks = F.pad(x.float(), (0, -k % 32)).reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    rounded = (torch.round(blocks * inv) * (amax / 127)).reshape(*x.shape[:-1], -1)
    return rounded[..., :k]


def int4_matmul(x: torch.Tensor, p: PackedInt4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """quantize_activations(x) (..., K) @ Wᵀ (+ bias) in float32, shape (..., N)."""
    lib, rows, y, b = _call_args(x, p.in_features, p.out_features, bias)
    lib.lm_int4q8_gemm(
        rows.data_ptr(), rows.shape[0], p.in_features, p.group_size, p.weight.data_ptr(), p.scale.data_ptr(),
        p.zero.data_ptr(), _ptr(b), y.data_ptr(), p.out_features, _threads(p.out_features, p.in_features),
    )  # fmt: skip
    return y
