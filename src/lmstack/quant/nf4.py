"""NormalFloat4 (NF4) with double quantisation, as in QLoRA (Dettmers et al. 2023).

Format. The flattened weight is cut into blocks of `block` (64) values; each block stores its absmax
`a` and every value as the index of the nearest of 16 levels `NF4_CODE` to `x / a`. The levels are
quantiles of a standard normal, rescaled to [-1, 1], with an exact zero — equal-mass bins for
normally distributed weights, which is what trained weights roughly are. Two codes share a byte,
the first value in the HIGH nibble (bitsandbytes' layout).

Double quantisation. The fp32 absmax constants cost 32/64 = 0.5 bit per weight. QLoRA quantises
them again: subtract their mean (`offset`), cut into blocks of 256 and store each as the index of the
nearest of the 256 values of a signed 8-bit dynamic (exponent + fraction) code, with one fp32 absmax
per 256 constants: 8/64 + 32/(64*256) ≈ 0.127 bit per weight.

Error bound. A value is off by at most half the widest gap between adjacent levels times its block's
absmax: |x - x̂| <= a * max_gap / 2 (max_gap = 1 - 0.7230 at the top of the table); with double
quantisation `a` itself carries the 8-bit code's error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.errors import InputError

# The 16 NF4 levels (QLoRA, appendix E): normal quantiles, normalised to [-1, 1], zero exact.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip


_ZERO_CODE = 7  # NF4_CODE[7] == 0.0


def dynamic_code(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The signed 8-bit dynamic code of Dettmers et al. (8-bit optimizers): for each decade 10^-k a
    run of linearly spaced fractions, so small constants keep relative precision. 256 sorted values."""
    non_sign_bits = total_bits - 1
    values = [0.0, 1.0]
    for i in range(max_exponent_bits):
        n = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        decade = 10 ** (-(max_exponent_bits - 1) + i)
        values += (decade * means).tolist() + (-decade * means).tolist()
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_code()


@dataclass(frozen=True)
class NF4Tensor:
    packed: torch.Tensor  # (numel // 2,) uint8, first value in the high nibble
    absmax: torch.Tensor  # (n_blocks,) float32, or uint8 codes into DYNAMIC_CODE when double-quantised
    shape: tuple[int, ...]
    block: int = 64
    absmax_scale: torch.Tensor | None = None  # (n_blocks / 256 rounded up,) float32 — double quant only
    offset: float = 0.0  # mean of the absmax constants, subtracted before double quant
    double_block: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of a sorted `code` (ties go to the upper level)."""
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)


def _blockwise(x: torch.Tensor, block: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax scaling per block (the last one may be short) and nearest-level codes."""
    n = x.numel()
    pad = (-n) % block
    blocks = torch.nn.functional.pad(x, (0, pad)).reshape(-1, block)  # zeros never raise an absmax
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    return _nearest(scaled.reshape(-1)[:n], code), absmax


def nf4_quantize(w: torch.Tensor, block: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantise any tensor to NF4 with `block` values per absmax; `double_quant` 8-bit-codes the absmaxes."""
    if block <= 0 or block % 2:
        raise InputError(f"NF4 block size must be a positive even number, got {block} — use 64 (QLoRA's)")
    flat = w.detach().reshape(-1).float()
    codes, absmax = _blockwise(flat, block, NF4_CODE)
    if codes.numel() % 2:  # pad with the code of 0.0, as bitsandbytes does
        codes = torch.cat([codes, codes.new_full((1,), _ZERO_CODE)])
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Tensor(packed, absmax, tuple(w.shape), block)
    offset = absmax.mean()
    absmax_codes, absmax_scale = _blockwise(absmax - offset, 256, DYNAMIC_CODE)
    return NF4Tensor(packed, absmax_codes, tuple(w.shape), block, absmax_scale, float(offset))


def nf4_absmax(q: NF4Tensor) -> torch.Tensor:
    """The per-block absmax constants, decoded from their 8-bit codes when double-quantised."""
    if q.absmax_scale is None:
        return q.absmax
    n = q.absmax.numel()
    scale = q.absmax_scale.repeat_interleave(q.double_block)[:n]
    return DYNAMIC_CODE.to(q.absmax.device).index_select(0, q.absmax.int()) * scale + q.offset


# The two levels each byte holds (high nibble first): decoding looks a byte up once, rather than
# splitting nibbles and looking each up (QLoRA decodes every frozen matrix twice per training step).
BYTE_LEVELS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)  # (256, 2)


def nf4_dequantize(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """level × block absmax for every value, in `dtype`."""
    numel = 1
    for size in q.shape:
        numel *= size
    levels = BYTE_LEVELS.to(q.packed.device).index_select(0, q.packed.int()).reshape(-1)  # (2 · bytes,)
    absmax = nf4_absmax(q)
    if levels.numel() != absmax.numel() * q.block:  # a short last block
        levels = torch.nn.functional.pad(levels, (0, absmax.numel() * q.block - levels.numel()))
    values = levels.view(-1, q.block) * absmax[:, None]  # (n_blocks, block): each block by its absmax
    return values.view(-1)[:numel].reshape(q.shape).to(dtype)
