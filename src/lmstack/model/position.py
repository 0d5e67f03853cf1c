"""Positional schemes: RoPE (with linear, dynamic-NTK, YaRN and Llama-3 scaling), learned, sinusoidal, ALiBi.

RoPE rotates each (x_i, x_{i+d/2}) pair of a query/key by an angle proportional to its position, so
the dot product q·k depends only on the relative distance (Su et al. 2021, RoFormer).
We use the "rotate half" layout of Hugging Face checkpoints so their weights load unpermuted.
"""

from __future__ import annotations

import functools
import math

import torch

from lmstack.config import ModelConfig


def rope_inv_freq(config: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the cos/sin scale for the config's RoPE scaling.

    `seq_len` (max position + 1 of the current call) matters only for dynamic NTK scaling, which
    raises the base once the sequence outgrows the pretraining context.
    """
    dim, theta = config.head_dim, config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    scaling, factor = config.rope_scaling, config.rope_factor
    if scaling == "dynamic":
        original = config.rope_original_max_seq_len
        seq_len = max(seq_len or original, original)
        theta = theta * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (theta**exponents)
    if scaling == "linear":
        return inv_freq / factor, 1.0
    if scaling == "llama3":
        return _llama3_inv_freq(inv_freq, config), 1.0
    if scaling == "yarn":
        return _yarn_inv_freq(inv_freq, config)
    return inv_freq, 1.0


def _llama3_inv_freq(inv_freq: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    # Llama 3.1: long wavelengths are interpolated by `factor`, short ones kept, the band between blended.
    old_len, factor = config.rope_original_max_seq_len, config.rope_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


def _yarn_inv_freq(inv_freq: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, float]:
    # YaRN (Peng et al. 2023): interpolate low frequencies, extrapolate high ones, linear ramp between,
    # and scale attention logits by 0.1 ln(s) + 1 through cos/sin.
    dim, factor, base = config.head_dim, config.rope_factor, config.rope_theta
    original = config.rope_original_max_seq_len

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(config.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(config.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    attention_factor = config.rope_attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor


@functools.lru_cache(maxsize=64)
def _static_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    # Frozen configs hash by value, so every model with the same RoPE shares one float32 table; it is
    # never a module buffer, so `model.to(bfloat16)` cannot round it.
    return rope_inv_freq(config)


def rope_cos_sin(
    config: ModelConfig, positions: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (B, T, head_dim) for integer positions (B, T), computed in float32."""
    if config.rope_scaling == "dynamic":
        inv_freq, scale = rope_inv_freq(config, int(positions.max()) + 1 if positions.numel() else None)
    else:
        inv_freq, scale = _static_inv_freq(config)
    inv_freq = inv_freq.to(positions.device)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, heads, D) by the angles behind cos/sin (B, T, D), the same for every head."""
    cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over heads
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def sinusoidal_embedding(
    positions: torch.Tensor, d_model: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The fixed sin/cos embedding of Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos."""
    inv = 1.0 / (
        10000.0 ** (torch.arange(0, d_model, 2, dtype=torch.float32, device=positions.device) / d_model)
    )
    angles = positions.float()[..., None] * inv  # (B, T, d/2)
    emb = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # interleave -> (B, T, d)
    return emb[..., :d_model].to(dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al. 2022): a geometric sequence 2^(-8/n), 2^(-16/n), ...

    For a head count that is not a power of two, take the slopes of the nearest lower power of two
    and fill the rest with every other slope of the next power, as in the paper's reference code.
    """

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two_slopes(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two_slopes(closest) + power_of_two_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)
