"""GGUF's block formats (llama.cpp's ggml), as raw bytes.

A row of `n` weights is stored as n / B blocks of B weights, each a fixed number of bytes; a matrix
(rows, cols) becomes (rows, cols / B * bytes_per_block) uint8, row-major, little-endian. fp16 scale
fields are IEEE half. Layouts (offsets in bytes):

  Q8_0  B=32   34 B: d f16 | q int8[32]                                   w = d*q
  Q4_0  B=32   18 B: d f16 | q 4-bit[32] (value j low nibble, j+16 high)  w = d*(q-8)
  Q4_1  B=32   20 B: d f16 | m f16 | q 4-bit[32]                          w = d*q + m
  Q5_0  B=32   22 B: d f16 | qh u32 (5th bit of value j in bit j) | q 4-bit[32]   w = d*(q-16)
  Q5_1  B=32   24 B: d f16 | m f16 | qh u32 | q 4-bit[32]                 w = d*q + m
  Q4_K  B=256 144 B: d f16 | dmin f16 | 8 x (6-bit scale, 6-bit min) in 12 B | q 4-bit[256]
                     sub-block s of 32: w = d*sc[s]*q - dmin*m[s]; 64 values share 32 bytes
                     (first 32 in low nibbles, next 32 in high)
  Q5_K  B=256 176 B: Q4_K plus qh[32] (bit 2c / 2c+1 of byte j: 5th bit of value 64c+j / 64c+32+j)
  Q6_K  B=256 210 B: ql[128] (low 4 bits) | qh[64] (high 2 bits) | scales int8[16] | d f16
                     sub-block s of 16: w = d*scales[s]*(q-32)

"K-quants" nest two levels of scale: 8-bit or 6-bit sub-block scales, themselves scaled by one fp16
`d` per 256 values, so a super-block costs little more than one scale while adapting to local range.
Their quantizers search a few candidate scales per sub-block and keep the one with the least weighted
squared error (llama.cpp's `make_qkx2_quants` / `make_qx_quants`); the simple formats round once.

All arithmetic is float32 in the order llama.cpp's reference C uses (sums left to right included), so
every quantizer here writes the bytes llama.cpp's reference quantizer (no importance matrix) writes.
"""

from __future__ import annotations

import numpy as np
import torch

from lmstack.errors import InputError

QK_K = 256
# name -> (weights per block, bytes per block)
GGML_BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_K": (QK_K, 144),
    "Q5_K": (QK_K, 176),
    "Q6_K": (QK_K, 210),
}
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

_F32 = np.float32


# ---- byte helpers ------------------------------------------------------------------------------
def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(n,) float32 -> (n, 2) uint8, rounded to nearest even half."""
    return x.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _f16_value(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float().reshape(-1, 1)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 2k) codes < 16 -> (n, k) bytes: value j in the low nibble, value j+k in the high one."""
    k = q.shape[1] // 2
    return (q[:, :k] | (q[:, k:] << 4)).to(torch.uint8)


def _unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b & 0x0F, b >> 4], dim=1)


def _bits_to_u32(bits: torch.Tensor) -> torch.Tensor:
    """(n, 32) bits -> (n, 4) little-endian bytes of the uint32 with bit j = bits[:, j]."""
    weights = 1 << torch.arange(8, dtype=torch.int32)
    return (bits.reshape(-1, 4, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def _u32_to_bits(b: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((b[:, :, None] >> shifts) & 1).reshape(b.shape[0], 32)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), without the x + 0.5 rounding error near .5."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _safe_inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


# ---- the 32-value formats ------------------------------------------------------------------------
def _q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _roundf(x * _safe_inv(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=1)


def _absmax_signed(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each row, sign kept (the first one on ties)."""
    return x.gather(1, x.abs().argmax(dim=1, keepdim=True))


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    d = _absmax_signed(x) / -8
    q = torch.trunc(x * _safe_inv(d) + _F32(8.5)).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], dim=1)


def _q4_1(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.trunc((x - lo) * _safe_inv(d) + _F32(0.5)).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], dim=1)


def _q5_0(x: torch.Tensor) -> torch.Tensor:
    d = _absmax_signed(x) / -16
    q = torch.trunc(x * _safe_inv(d) + _F32(16.5)).clamp(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _bits_to_u32(q >> 4), _pack_nibbles(q & 0x0F)], dim=1)


def _q5_1(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    d = (hi - lo) / 31
    q = torch.trunc((x - lo) * _safe_inv(d) + _F32(0.5)).clamp(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _bits_to_u32(q >> 4), _pack_nibbles(q & 0x0F)], dim=1)


def _dq8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16_value(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _dq4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16_value(b[:, :2]) * (_unpack_nibbles(b[:, 2:]).float() - 8)


def _dq4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16_value(b[:, :2]) * _unpack_nibbles(b[:, 4:]).float() + _f16_value(b[:, 2:4])


def _dq5_0(b: torch.Tensor) -> torch.Tensor:
    q = _unpack_nibbles(b[:, 6:]) | (_u32_to_bits(b[:, 2:6]) << 4)
    return _f16_value(b[:, :2]) * (q.float() - 16)


def _dq5_1(b: torch.Tensor) -> torch.Tensor:
    q = _unpack_nibbles(b[:, 8:]) | (_u32_to_bits(b[:, 4:8]) << 4)
    return _f16_value(b[:, :2]) * q.float() + _f16_value(b[:, 2:4])


# ---- K-quants ------------------------------------------------------------------------------------
# The K-quant searches compare float32 sums, so bit-equality with llama.cpp's reference quantizer needs
# its arithmetic exactly: every operation rounded to float32 in C's order (no fused multiply-add), sums
# accumulated left to right (torch's .sum() reduces pairwise and can flip a near-tie), constants divided
# as float32 tensors (torch evaluates `c / t` as `t.reciprocal() * c`, which rounds differently), square
# roots correctly rounded.
def _c(value: float) -> torch.Tensor:
    """A float32 constant, rounded once as C's float literal or int-to-float conversion is."""
    return torch.tensor(_F32(value))


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 top to bottom, as llama.cpp's `for (...) sum += ...` loops do. The K-quant
    searches keep blocks as columns, (block length, blocks), so each term is a contiguous row."""
    acc = t[0]
    for row in t[1:]:
        acc = acc + row
    return acc


def _nearest_int(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int: round half to even (its `x + 1.5 * 2^23` trick), as a float."""
    return torch.round(x)


def _make_qkx2(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted least-squares (scale, -min) per column of `x` for codes in [0, nmax] (llama.cpp's
    make_qkx2_quants): start from the min/max grid, then try nstep+1 stretched grids, refit scale and
    min in closed form for each and keep the best, re-spanning from the best min so far. Returns
    (scale, -min, codes)."""
    lo = x.amin(dim=0).clamp(max=0)
    hi = x.amax(dim=0)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    flat = hi == lo
    ones = torch.ones_like(hi)
    iscale = _c(nmax) / torch.where(flat, ones, hi - lo)
    scale = _c(1) / iscale
    codes = _nearest_int(iscale * (x - lo)).clamp(0, nmax)
    diff = scale * codes + lo - x
    best = _seq_sum(w * (diff * diff))
    for step in range(nstep + 1):
        span = torch.where(flat, ones, hi - lo)
        iscale = _c(_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / span
        cand = _nearest_int(iscale * (x - lo)).clamp(0, nmax)
        wl = w * cand
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * cand), _seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe_det = torch.where(ok, det, ones)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = this_min > 0  # the min may not move above zero: refit the scale alone
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, ones), this_scale)
        diff = this_scale * cand + this_min - x
        err = _seq_sum(w * (diff * diff))
        better = ok & (err < best) & ~flat
        codes = torch.where(better, cand, codes)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    return scale, -lo, codes


def _uint8_code(x: torch.Tensor, cap: int) -> torch.Tensor:
    """C's `uint8_t l = nearest_int(x); l = MIN(cap, l)`: wraps negatives modulo 256 before capping."""
    return torch.remainder(_nearest_int(x), 256).clamp(max=cap)


def _pack_scale_min(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins (n, 8) -> the 12 bytes of Q4_K/Q5_K: low 6 bits of the first four of
    each in bytes 0-7 (top 2 bits holding the high bits of the last four), low nibbles of the last four
    in bytes 8-11."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    b0 = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    b1 = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    b2 = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat([b0, b1, b2], dim=1)


def _unpack_scale_min(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


def _k_codes(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared by Q4_K (nmax 15) and Q5_K (nmax 31): (n, 256) -> header bytes (n, 16), codes (n, 256)."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    cols = sub.t().contiguous()  # sub-blocks as columns
    # sqrt in float64, then rounded: torch's vectorised float32 sqrt is not always correctly rounded
    av_x = torch.sqrt((_seq_sum(cols * cols) / _c(32)).double()).float()
    weights = av_x + cols.abs()  # weight large values more: they dominate the dot products
    scales, mins, codes = _make_qkx2(cols, weights, nmax, rmin, 0.1, nstep)
    scales, mins, codes = scales.reshape(n, 8), mins.reshape(n, 8), codes.t().reshape(n, 256)
    max_scale = scales.amax(1, keepdim=True).clamp(min=0)
    max_min = mins.amax(1, keepdim=True).clamp(min=0)
    zero = torch.zeros_like(max_scale)
    inv_scale = torch.where(max_scale > 0, _c(63) / torch.where(max_scale > 0, max_scale, 1), zero)
    inv_min = torch.where(max_min > 0, _c(63) / torch.where(max_min > 0, max_min, 1), zero)
    ls, lm = _uint8_code(inv_scale * scales, 63), _uint8_code(inv_min * mins, 63)
    d_bytes, dmin_bytes = _f16_bytes(max_scale / _c(63)), _f16_bytes(max_min / _c(63))
    d = _f16_value(d_bytes) * ls  # (n, 8): what the decoder will use
    dm = _f16_value(dmin_bytes) * lm
    safe_d = torch.where(d == 0, torch.ones_like(d), d)
    requant = _nearest_int((sub.reshape(n, 8, 32) + dm[..., None]) / safe_d[..., None]).clamp(0, nmax)
    codes = torch.where((d != 0)[..., None], requant, codes.reshape(n, 8, 32)).reshape(n, 256)
    header = torch.cat([d_bytes, dmin_bytes, _pack_scale_min(ls, lm)], dim=1)
    return header, codes.to(torch.uint8)


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    header, q = _k_codes(x, 15, -1.0, 20)
    qs = _pack_nibbles(q.reshape(-1, 64)).reshape(-1, 128)
    return torch.cat([header, qs], dim=1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    header, q = _k_codes(x, 31, -0.5, 15)
    n = x.shape[0]
    qs = _pack_nibbles((q & 0x0F).reshape(-1, 64)).reshape(n, 128)
    high = (q >> 4).reshape(n, 4, 2, 32)  # chunk c of 64, half h: bit 2c+h of byte j
    shifts = (2 * torch.arange(4)[:, None] + torch.arange(2)[None, :]).to(torch.uint8)
    qh = (high << shifts[None, :, :, None]).sum(dim=(1, 2)).to(torch.uint8)
    return torch.cat([header, qh, qs], dim=1)


def _make_qx(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes in [-nmax, nmax-1] per column, weighted by x² (llama.cpp's make_qx_quants with
    rmse_type 1): the absmax grid and 18 stretched ones, keeping the best least-squares fit.
    Returns (scale, codes + nmax)."""
    amax = x.abs().amax(dim=0)
    tiny = amax < 1e-15
    mx = _absmax_signed(x.t()).squeeze(1)
    mx = torch.where(tiny, torch.ones_like(mx), mx)
    wx = x * x * x  # (w * x) with w = x²: the order C multiplies in

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lvl = _nearest_int(iscale * x).clamp(-nmax, nmax - 1)
        return lvl, _seq_sum(wx * lvl), _seq_sum(x * x * lvl * lvl)

    iscale = _c(-nmax) / mx
    lvl, sumlx, suml2 = fit(iscale)
    ones = torch.ones_like(suml2)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, ones), torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s != 0]:
        iscale = -_c(_F32(nmax) + _F32(0.1) * _F32(step)) / mx
        cand, c_lx, c_l2 = fit(iscale)
        better = (c_l2 > 0) & (c_lx * c_lx > best * c_l2)
        c_scale = c_lx / torch.where(c_l2 > 0, c_l2, ones)
        lvl = torch.where(better, cand, lvl)
        scale = torch.where(better, c_scale, scale)
        best = torch.where(better, c_scale * c_lx, best)
    scale = torch.where(tiny, torch.zeros_like(scale), scale)
    codes = torch.where(tiny, torch.zeros_like(lvl), lvl + nmax)
    return scale, codes


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    scales, codes = _make_qx(sub.t().contiguous(), 32)
    scales, codes = scales.reshape(n, 16), codes.t().reshape(n, 16, 16)
    max_scale = _absmax_signed(scales)  # (n, 1)
    zero_block = max_scale.abs() < 1e-15
    iscale = _c(-128) / torch.where(zero_block, torch.ones_like(max_scale), max_scale)
    d_bytes = _f16_bytes(_c(1) / iscale)
    sc = _nearest_int(iscale * scales).clamp(max=127)
    d = _f16_value(d_bytes) * sc
    safe_d = torch.where(d == 0, torch.ones_like(d), d)
    requant = _nearest_int(sub.reshape(n, 16, 16) / safe_d[..., None]).clamp(-32, 31) + 32
    q = torch.where((d != 0)[..., None], requant, codes).reshape(n, 2, 4, 32).to(torch.uint8)
    # per half of 128: quarter k of 32 values; ql holds quarters (0, 2) and (1, 3) as nibble pairs
    low = q & 0x0F
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    qh = ((q >> 4) << shifts[None, None, :, None]).sum(dim=2).to(torch.uint8)
    out = torch.cat(
        [ql.reshape(n, 128), qh.reshape(n, 64), sc.to(torch.int8).view(torch.uint8), d_bytes], dim=1
    )
    out[zero_block.squeeze(1)] = 0
    return out


def _dq_k(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    sc, mn = _unpack_scale_min(b[:, 4:16])
    d = _f16_value(b[:, :2]) * sc
    dm = _f16_value(b[:, 2:4]) * mn
    return (d[..., None] * q.reshape(-1, 8, 32).float() - dm[..., None]).reshape(-1, QK_K)


def _dq4_k(b: torch.Tensor) -> torch.Tensor:
    return _dq_k(b, _unpack_nibbles(b[:, 16:].reshape(-1, 32)))


def _dq5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    low = _unpack_nibbles(b[:, 48:].reshape(-1, 32)).reshape(n, 4, 2, 32)
    shifts = (2 * torch.arange(4)[:, None] + torch.arange(2)[None, :]).to(torch.uint8)
    high = (b[:, None, None, 16:48] >> shifts[None, :, :, None]) & 1
    return _dq_k(b, low | (high << 4))


def _dq6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 2, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2)  # quarters 0, 1, 2, 3
    high = (qh >> shifts[None, None, :, None]) & 0x03
    q = (low | (high << 4)).reshape(n, 16, 16).float() - 32
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    return (_f16_value(b[:, 208:210])[..., None] * scales[..., None] * q).reshape(n, QK_K)


_QUANTIZE = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
             "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}  # fmt: skip
_DEQUANTIZE = {"Q8_0": _dq8_0, "Q4_0": _dq4_0, "Q4_1": _dq4_1, "Q5_0": _dq5_0, "Q5_1": _dq5_1,
               "Q4_K": _dq4_k, "Q5_K": _dq5_k, "Q6_K": _dq6_k}  # fmt: skip


def _check(qtype: str, cols: int) -> tuple[int, int]:
    if qtype not in GGML_BLOCKS:
        raise InputError(f"GGML type {qtype!r} is not supported — use one of {', '.join(QUANTIZABLE)}")
    block, nbytes = GGML_BLOCKS[qtype]
    if cols % block:
        raise InputError(
            f"{qtype} needs rows whose width is a multiple of {block}, got {cols} — use a type with smaller blocks (e.g. F16)"
        )
    return block, nbytes


def ggml_quantize(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """Rows of `w` (any shape, last dim = row width) -> uint8 (rows..., width / B * bytes_per_block)."""
    block, nbytes = _check(qtype, w.shape[-1])
    x = w.detach().float().contiguous()
    lead = tuple(x.shape[:-1])
    if qtype == "F32":
        return x.view(torch.uint8).reshape(*lead, -1)
    if qtype in ("F16", "BF16"):
        return x.to(torch.float16 if qtype == "F16" else torch.bfloat16).view(torch.uint8).reshape(*lead, -1)
    out = _QUANTIZE[qtype](x.reshape(-1, block))
    return out.reshape(*lead, x.shape[-1] // block * nbytes)


def ggml_dequantize(data: torch.Tensor, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 bytes of a tensor of logical `shape` (last dim = row width) -> float32 of that shape."""
    block, nbytes = _check(qtype, shape[-1])
    flat = data.reshape(-1).contiguous()
    numel = int(np.prod(shape))
    if flat.numel() != numel // block * nbytes:
        raise InputError(
            f"{qtype} tensor of shape {tuple(shape)} needs {numel // block * nbytes} bytes, got {flat.numel()} — the file is truncated or corrupt"
        )
    if qtype in ("F32", "F16", "BF16"):
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qtype]
        return flat.view(dtype).float().reshape(shape)
    return _DEQUANTIZE[qtype](flat.reshape(-1, nbytes)).reshape(shape)
