"""Roofline estimates: decode and prefill speed, the memory/compute crossover, serving capacity, training time.

Every time here is a lower bound (so every rate an upper bound) from the roofline model: a step takes
max(bytes moved / bandwidth, FLOPs / peak). Decode reads, per step, the weights a step touches and the
KV cache of every sequence in the batch, and computes `decode_flops_per_token` per sequence; prefill
and training are compute-bound and run at a stated MFU (model FLOPs utilisation, 0 < mfu <= 1).
With `n_gpus` > 1 the bandwidth, peak and memory add up (ideal tensor parallelism, no communication).

Weights read per decode step: all weights except the token-embedding table (untied: only the batch's
rows are gathered) and a learned position table; for MoE only the experts some token in the batch
routes to, expected E·(1 − (1 − k/E)^B) per layer under uniform, independent routing.
"""

from __future__ import annotations

import math

from lmstack.arith.flops import decode_flops_per_token
from lmstack.arith.hardware import Hardware
from lmstack.arith.kv_cache import kv_cache
from lmstack.arith.memory import FULL_PRECISION, bytes_per_element, weights_bytes
from lmstack.arith.params import count_params
from lmstack.config import ModelConfig

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal D ≈ 20 N


# ---- pure roofline functions (numbers in, numbers out) ---------------------------------------------
def step_seconds(bytes_moved: float, flops: float, hw: Hardware, n_gpus: int = 1) -> tuple[float, str]:
    """(seconds, "memory" or "compute"): whichever of the two bounds binds."""
    memory_s = bytes_moved / (hw.bandwidth_bytes_per_s * n_gpus)
    compute_s = flops / (hw.peak_flops * n_gpus)
    return (memory_s, "memory") if memory_s >= compute_s else (compute_s, "compute")


def decode_tokens_per_s(
    weight_bytes: float,
    flops_per_token: float,
    hw: Hardware,
    batch: int = 1,
    kv_bytes_per_sequence: float = 0.0,
    n_gpus: int = 1,
) -> float:
    """Total tokens/s across the batch: one token per sequence per step, weights read once per step."""
    seconds, _ = step_seconds(
        weight_bytes + batch * kv_bytes_per_sequence, batch * flops_per_token, hw, n_gpus
    )
    return batch / seconds


def crossover_batch(
    weight_bytes: float, flops_per_token: float, hw: Hardware, kv_bytes_per_sequence: float = 0.0
) -> float | None:
    """Batch at which decode turns compute-bound: B·F/peak = (W + B·kv)/bandwidth.

    Without KV traffic this is ridge × W/F (156 for a bf16 dense model on an A100 at 2 TB/s: each
    weight byte then serves B FLOPs). None when KV reads grow as fast as compute (never compute-bound).
    """
    margin = flops_per_token / hw.peak_flops - kv_bytes_per_sequence / hw.bandwidth_bytes_per_s
    if margin <= 0:
        return None
    return (weight_bytes / hw.bandwidth_bytes_per_s) / margin


def prefill_seconds(flops: float, hw: Hardware, mfu: float, n_gpus: int = 1) -> float:
    return flops / (hw.peak_flops * mfu * n_gpus)


def max_users(
    memory_bytes: float, weights: float, kv_bytes_per_sequence: float, reserve_bytes: float = 0.0
) -> int:
    """Concurrent sequences whose KV caches fit: ⌊(memory − weights − reserve) / KV per sequence⌋, ≥ 0."""
    free = memory_bytes - weights - reserve_bytes
    return max(0, math.floor(free / kv_bytes_per_sequence)) if kv_bytes_per_sequence > 0 else 0


def chinchilla_tokens(n_params: float) -> float:
    return CHINCHILLA_TOKENS_PER_PARAM * n_params


def train_seconds(flops: float, hw: Hardware, n_gpus: int, mfu: float) -> float:
    return flops / (n_gpus * hw.peak_flops * mfu)


def cost_per_million_tokens(tokens_per_s: float, price_per_gpu_hour: float, n_gpus: int = 1) -> float:
    """Dollars per 1M generated tokens at a sustained rate: GPU-hours per 1M tokens × price."""
    return price_per_gpu_hour * n_gpus / (tokens_per_s * 3600) * 1e6


# ---- model-aware wrappers --------------------------------------------------------------------------
def expected_active_experts(n_experts: int, k: int, batch: float) -> float:
    """Experts some token of the batch routes to, under uniform independent top-k routing."""
    return n_experts * (1 - (1 - k / n_experts) ** batch)


def decode_weight_bytes(config: ModelConfig, dtype: str = "bf16", batch: float = 1) -> float:
    """Weight bytes one decode step reads (module doc: embeddings gathered, idle experts skipped)."""
    p = count_params(config)
    other = bytes_per_element(dtype) if dtype in FULL_PRECISION else 2.0
    linear = bytes_per_element(dtype)
    skipped = p.position_embedding * other + (0 if p.tied else p.token_embedding * other)
    layer = p.layer
    if layer.n_experts:
        idle = layer.n_experts - expected_active_experts(layer.n_experts, layer.experts_per_token, batch)
        skipped += p.n_layers * idle * (layer.mlp * linear + layer.mlp_bias * other)
    return weights_bytes(p, dtype) - skipped


def decode_estimate(
    config: ModelConfig,
    hw: Hardware,
    *,
    batch: int = 1,
    context: int = 2048,
    dtype: str = "bf16",
    kv_dtype: str = "bf16",
    n_gpus: int = 1,
) -> dict[str, object]:
    """Decode step at `batch` sequences that each hold `context` tokens (the worst step: caches full)."""
    kv = kv_cache(config, context, batch, kv_dtype)
    weights = decode_weight_bytes(config, dtype, batch)
    flops_per_token = decode_flops_per_token(config, context)
    bytes_moved = weights + kv.bytes_per_batch
    flops = batch * flops_per_token
    seconds, bound = step_seconds(bytes_moved, flops, hw, n_gpus)
    group = _group(hw, n_gpus)
    by_dtype = {}
    for d in ("bf16", "int8", "int4"):
        w = decode_weight_bytes(config, d, batch)
        by_dtype[d] = decode_tokens_per_s(w, flops_per_token, group, batch, kv.bytes_per_sequence)
    return {
        "tokens_per_s": batch / seconds,
        "tokens_per_s_per_sequence": 1 / seconds,
        "step_s": seconds,
        "bound": bound,
        "weight_bytes_per_step": weights,
        "kv_bytes_per_step": kv.bytes_per_batch,
        "flops_per_step": flops,
        "flops_per_token": flops_per_token,
        "arithmetic_intensity": flops / bytes_moved,
        "ridge_flops_per_byte": hw.ridge_flops_per_byte,
        "crossover_batch": decode_crossover_batch(config, group, context, dtype, kv_dtype),
        "crossover_batch_weights_only": decode_crossover_batch(
            config, group, 1, dtype, kv_dtype, with_kv=False
        ),
        "tokens_per_s_by_weight_dtype": by_dtype,
    }


def decode_crossover_batch(
    config: ModelConfig,
    hw: Hardware,
    context: int,
    dtype: str = "bf16",
    kv_dtype: str = "bf16",
    *,
    with_kv: bool = True,
) -> float | None:
    """`crossover_batch` for a config; for MoE the weights read grow with the batch, so solve by bisection."""
    kv = kv_cache(config, context, 1, kv_dtype).bytes_per_sequence if with_kv else 0.0
    flops = decode_flops_per_token(config, context)
    if not config.is_moe:
        return crossover_batch(decode_weight_bytes(config, dtype, 1), flops, hw, kv)
    margin = flops / hw.peak_flops - kv / hw.bandwidth_bytes_per_s
    if margin <= 0:
        return None

    def excess(b: float) -> float:  # compute time − memory time; convex, negative at 0
        return b * margin - decode_weight_bytes(config, dtype, b) / hw.bandwidth_bytes_per_s

    lo, hi = 0.0, 1.0
    while excess(hi) < 0:
        lo, hi = hi, hi * 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
    return hi


def _group(hw: Hardware, n_gpus: int) -> Hardware:
    """N GPUs as one device (ideal tensor parallelism)."""
    if n_gpus == 1:
        return hw
    return Hardware(
        f"{n_gpus}x{hw.name}",
        hw.peak_flops * n_gpus,
        hw.bandwidth_bytes_per_s * n_gpus,
        hw.memory_bytes * n_gpus,
    )
