"""`analyze`: every number for a config in one JSON-ready dict, and `format_report`: the same as tables.

Units in the dict are plain SI: parameters as integers, bytes, FLOPs (2 per multiply-add), seconds,
tokens, dollars. The human-readable tables print bytes both in GB (1e9) and GiB (2**30), labelled.
Definitions of each quantity live in the docstrings of `params`, `flops`, `kv_cache`, `memory` and
`throughput`; `analyze` only composes them.
"""

from __future__ import annotations

from typing import Any

from lmstack.arith.flops import forward_flops, seed_attention_layer_flops, training_flops_6nd
from lmstack.arith.hardware import GB, GIB, Hardware, get_hardware
from lmstack.arith.kv_cache import kv_cache
from lmstack.arith.memory import (
    BITS,
    CHECKPOINTING,
    FULL_PRECISION,
    OPTIMIZER_STATE_BYTES,
    SHARDING,
    activation_bytes,
    finetune_memory,
    lora_memory,
    sharded_training_bytes,
    training_bytes_per_param,
    weights_bytes,
)
from lmstack.arith.params import count_params
from lmstack.arith.throughput import (
    chinchilla_tokens,
    cost_per_million_tokens,
    decode_estimate,
    max_users,
    prefill_seconds,
    train_seconds,
)
from lmstack.config import ModelConfig
from lmstack.errors import InputError

DEFAULT_HARDWARE = "h100-sxm"
DEFAULT_PRICE_PER_GPU_HOUR = 3.0  # a typical H100 cloud price, ~$3/hour; an assumption, pass your own
DEFAULT_RESERVE_FRACTION = 0.1  # vLLM's default gpu_memory_utilization=0.9 leaves 10% for activations etc.


def analyze(
    config: ModelConfig,
    *,
    hardware: str | Hardware = DEFAULT_HARDWARE,
    batch: int = 1,
    context: int | None = None,
    dtype: str = "bf16",
    kv_dtype: str | None = None,
    gpus: int = 1,
    mfu: float = 0.5,
    lora_rank: int = 16,
    lora_targets: tuple[str, ...] | str = ("q", "v"),
    adapter: str = "lora",
    causal: bool = False,
    optimizer: str = "adamw",
    trainable_tokens: int = 0,
    price_per_gpu_hour: float = DEFAULT_PRICE_PER_GPU_HOUR,
    reserve_fraction: float = DEFAULT_RESERVE_FRACTION,
    training_tokens: float | None = None,
) -> dict[str, Any]:
    """All the arithmetic for `config` as one nested dict (the JSON of `lmstack calc --json`).

    `context` defaults to min(max_seq_len, 4096); `kv_dtype` to `dtype` when that is a float type,
    else bf16. `gpus` act as one tensor-parallel group for inference and as data-parallel ranks for the
    sharded training memory. `training_tokens` defaults to Chinchilla's 20 per parameter.
    """
    hw = get_hardware(hardware)
    context = min(config.max_seq_len, 4096) if context is None else context
    kv_dtype = kv_dtype or (dtype if dtype in ("fp32", "bf16", "fp16") else "bf16")
    _validate(batch=batch, context=context, gpus=gpus, mfu=mfu, lora_rank=lora_rank)
    for name, value in (("dtype", dtype), ("kv_dtype", kv_dtype)):
        if value not in BITS:
            raise InputError(f"unknown {name} {value!r} — use one of {', '.join(BITS)}")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise InputError(f"unknown optimizer {optimizer!r} — use one of {', '.join(OPTIMIZER_STATE_BYTES)}")
    if not 0 <= reserve_fraction < 1 or price_per_gpu_hour < 0:
        raise InputError("reserve_fraction must lie in [0, 1) and the price must be >= 0")

    p = count_params(config)
    fwd = forward_flops(config, context, causal=causal)
    fwd_causal = forward_flops(config, context, causal=True)
    kv = kv_cache(config, context, batch, kv_dtype)
    weights = weights_bytes(p, dtype)
    per_param = training_bytes_per_param(optimizer)
    decode = decode_estimate(
        config, hw, batch=batch, context=context, dtype=dtype, kv_dtype=kv_dtype, n_gpus=gpus
    )
    memory_total = hw.memory_bytes * gpus
    reserve = reserve_fraction * memory_total
    users = max_users(memory_total, weights, kv.bytes_per_sequence, reserve)
    at_capacity = (
        decode_estimate(config, hw, batch=users, context=context, dtype=dtype, kv_dtype=kv_dtype, n_gpus=gpus)
        if users
        else None
    )
    tokens = chinchilla_tokens(p.total) if training_tokens is None else training_tokens
    train_flops = 3 * fwd.per_token * tokens
    seconds = train_seconds(train_flops, hw, gpus, mfu)
    warnings = []
    if context > config.max_seq_len:
        warnings.append(f"context {context} exceeds the model's max_seq_len {config.max_seq_len}")
    if users == 0:
        warnings.append("the weights plus one sequence's KV cache do not fit in the stated memory")

    return {
        "model": {"name": config.name, "family": config.family, "config": config.to_dict()},
        "inputs": {
            "hardware": hw.to_dict(),
            "batch": batch,
            "context": context,
            "dtype": dtype,
            "kv_dtype": kv_dtype,
            "gpus": gpus,
            "mfu": mfu,
            "causal": causal,
            "optimizer": optimizer,
            "adapter": adapter,
            "price_per_gpu_hour": price_per_gpu_hour,
            "reserve_fraction": reserve_fraction,
        },
        "params": p.to_dict(),
        "flops": {
            "forward_per_token": fwd.per_token,
            "forward_total": fwd.total,
            "forward_per_token_causal": fwd_causal.per_token,
            "forward": fwd.to_dict(),
            "decode_per_token": decode["flops_per_token"],
            "training_per_token": 3 * fwd.per_token,
            "training_per_token_6n": 6 * p.active,
            "seed_attention_layer": seed_attention_layer_flops(context, config.d_model),
        },
        "kv_cache": kv.to_dict(),
        "memory": {
            "weights_bytes": weights,
            "weights_bytes_by_dtype": {d: weights_bytes(p, d) for d in BITS},
            "training_bytes": p.total * per_param,
            "training_bytes_per_param": per_param,
            "gradients_bytes": p.total * 2,
            "master_weights_bytes": p.total * 4,
            "optimizer_state_bytes": {o: p.total * b for o, b in OPTIMIZER_STATE_BYTES.items()},
            "per_gpu_training_bytes": {
                s: sharded_training_bytes(p.total, gpus, s, optimizer) for s in SHARDING
            },
            "activations_bytes": {m: activation_bytes(config, batch, context, m) for m in CHECKPOINTING},
            "lora": lora_memory(config, lora_rank, lora_targets, "bf16"),
            "qlora": lora_memory(config, lora_rank, lora_targets, "nf4"),
            "inference_bytes": weights + kv.bytes_per_batch,
            "finetune": finetune_memory(
                config,
                adapter=adapter,
                rank=lora_rank,
                targets=lora_targets,
                optimizer=optimizer,
                batch=batch,
                context=context,
                trainable_tokens=trainable_tokens,
                precision=dtype if dtype in FULL_PRECISION else "bf16",  # --dtype fp32: fp32 training
            ),
        },
        "decode": decode,
        "prefill": {
            "flops": fwd_causal.total * batch,
            "seconds": prefill_seconds(fwd_causal.total * batch, hw, mfu, gpus),
        },
        "serving": {
            "max_users": users,
            "memory_bytes": memory_total,
            "reserve_bytes": reserve,
            "kv_bytes_per_user": kv.bytes_per_sequence,
            "cost_per_1m_tokens": cost_per_million_tokens(decode["tokens_per_s"], price_per_gpu_hour, gpus),
            "tokens_per_s_at_max_users": at_capacity["tokens_per_s"] if at_capacity else 0.0,
            "cost_per_1m_tokens_at_max_users": (
                cost_per_million_tokens(at_capacity["tokens_per_s"], price_per_gpu_hour, gpus)
                if at_capacity
                else None
            ),
        },
        "training": {
            "chinchilla_tokens": chinchilla_tokens(p.total),
            "tokens": tokens,
            "flops_6nd": float(training_flops_6nd(p.active, tokens)),
            "flops_exact": train_flops,
            "seconds": seconds,
            "gpu_hours": seconds * gpus / 3600,
            "cost": seconds * gpus / 3600 * price_per_gpu_hour,
        },
        "warnings": warnings,
    }


def _validate(**values: float) -> None:
    for name, value in values.items():
        if name == "mfu":
            if not 0 < value <= 1:
                raise InputError(f"mfu must lie in (0, 1], got {value} — e.g. 0.5 for 50%")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")


# ---- human-readable tables -------------------------------------------------------------------------
def count(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n:,.0f} ({n / scale:.2f} {suffix})"
    return f"{n:,.0f}"


def size(n: float) -> str:
    """Bytes as 'x GB / y GiB' (decimal and binary, both labelled)."""
    if abs(n) < 1e6:
        return f"{n:,.0f} B ({n / 1024:,.1f} KiB)"
    if abs(n) < 1e9:
        return f"{n / 1e6:,.1f} MB / {n / 2**20:,.1f} MiB"
    return f"{n / GB:,.2f} GB / {n / GIB:,.2f} GiB"


def duration(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 60:
        return f"{s:.2f} s"
    if s < 3600 * 48:
        return f"{s:,.1f} s ({s / 3600:.2f} h)"
    return f"{s:,.0f} s ({s / 86400:.1f} days)"


def format_report(result: dict[str, Any]) -> str:
    """Plain-text tables of `analyze`'s result."""
    i, p, f, kv, m = result["inputs"], result["params"], result["flops"], result["kv_cache"], result["memory"]
    d, s, t, hw = result["decode"], result["serving"], result["training"], i["hardware"]
    layer, gpus = p["per_layer"], i["gpus"]
    name = result["model"]["name"] or result["model"]["family"]
    lines = [
        f"{name} on {gpus} × {hw['name']} — batch {i['batch']}, context {i['context']}, weights {i['dtype']}, "
        f"KV {i['kv_dtype']}, MFU {i['mfu']:.0%}",
    ]

    def section(title: str, rows: list[tuple[str, str]]) -> None:
        lines.append("")
        lines.append(title)
        width = max(len(k) for k, _ in rows)
        lines.extend(f"  {k:<{width}}  {v}" for k, v in rows)

    section("Parameters (exact)", [
        ("total", count(p["total"])),
        ("active per token", count(p["active"])),
        ("embedding (token + position)", count(p["embedding"])),
        ("LM head", count(p["lm_head"]) + (" (tied)" if p["tied_embeddings"] else "")),
        ("non-embedding", count(p["non_embedding"])),
        ("per layer", f"{layer['total']:,} = attention {layer['attention']:,} + MLP {layer['mlp']:,}"
                      f" + router {layer['router']:,} + norms {layer['norms']:,}"),
    ])  # fmt: skip
    mode = "causal pairs" if i["causal"] else "full s²"
    section(f"FLOPs (matmuls, 2 per multiply-add, attention {mode})", [
        ("forward per token", f"{f['forward_per_token']:.4g}"),
        (f"forward, {i['context']} tokens", f"{f['forward_total']:.4g}"),
        ("forward per token, causal", f"{f['forward_per_token_causal']:.4g}"),
        ("decode per token at context", f"{f['decode_per_token']:.4g}"),
        ("training per token: 3 × forward | 6N", f"{f['training_per_token']:.4g} | {f['training_per_token_6n']:.4g}"),
    ])  # fmt: skip
    section(f"KV cache ({kv['dtype']})", [
        ("per token", size(kv["bytes_per_token"])),
        (f"per sequence ({kv['tokens_per_sequence']} tokens cached)", size(kv["bytes_per_sequence"])),
        (f"per batch of {kv['batch']}", size(kv["bytes_per_batch"])),
    ])  # fmt: skip
    by = m["weights_bytes_by_dtype"]
    sharded = m["per_gpu_training_bytes"]
    act = m["activations_bytes"]
    lora, qlora, ft = m["lora"], m["qlora"], m["finetune"]
    ft_label = (
        "full" if ft["adapter"] == "none" else f"{ft['adapter']} r={ft['rank']} on {','.join(ft['targets'])}"
    )
    section("Memory", [
        *((f"weights {k}", size(v)) for k, v in by.items() if k != "fp8"),
        (f"training state ({i['optimizer']}, {m['training_bytes_per_param']} B/param)", size(m["training_bytes"])),
        (f"  per GPU over {gpus}: DDP | ZeRO-1 | ZeRO-2 | ZeRO-3/FSDP",
         " | ".join(f"{sharded[k] / GB:,.1f}" for k in SHARDING) + " GB"),
        ("activations: none | selective | full recompute",
         " | ".join(f"{act[k] / GB:,.1f}" for k in CHECKPOINTING) + " GB"),
        (f"LoRA r={lora['rank']} α={lora['alpha']} on {','.join(lora['targets'])}",
         f"{lora['trainable_params']:,} trainable ({lora['trainable_fraction']:.3%}); "
         f"{lora['total_bytes'] / GB:,.2f} GB bf16 base, {qlora['total_bytes'] / GB:,.2f} GB NF4 base (QLoRA)"),
        (f"fine-tune ({ft_label}, {ft['optimizer']}, batch {i['batch']} × {i['context']})",
         f"{ft['trainable_params']:,} trainable; {size(ft['total_bytes'])} = base {ft['base_weights_bytes'] / GB:,.2f} "
         f"+ trained+grads {ft['trained_weights_and_gradients_bytes'] / GB:,.2f} + optimizer "
         f"{ft['optimizer_state_bytes'] / GB:,.2f} + activations {ft['activations_bytes'] / GB:,.2f} "
         f"+ loss {ft['loss_peak_bytes'] / GB:,.2f} GB"),
    ])  # fmt: skip
    cross = d["crossover_batch"]
    by_dtype = d["tokens_per_s_by_weight_dtype"]
    section(f"Inference on {gpus} × {hw['name']} (roofline upper bounds)", [
        ("decode tokens/s (batch total)", f"{d['tokens_per_s']:,.1f} ({d['bound']}-bound; "
                                          f"{d['tokens_per_s_per_sequence']:,.1f} per sequence)"),
        ("decode tokens/s: bf16 | int8 | int4 weights", " | ".join(f"{by_dtype[k]:,.1f}" for k in by_dtype)),
        ("arithmetic intensity | ridge", f"{d['arithmetic_intensity']:,.1f} | {d['ridge_flops_per_byte']:,.1f} FLOP/B"),
        ("crossover batch (with KV | weights only)",
         f"{'never' if cross is None else f'{cross:,.1f}'} | {d['crossover_batch_weights_only']:,.1f}"),
        (f"prefill of {i['context']} tokens × {i['batch']} at MFU {i['mfu']:.0%}", duration(result["prefill"]["seconds"])),
        (f"max users at {i['context']} tokens ({i['reserve_fraction']:.0%} reserve)", f"{s['max_users']:,}"),
        (f"cost per 1M tokens (${i['price_per_gpu_hour']:.2f}/GPU-h): batch | max users",
         f"${s['cost_per_1m_tokens']:,.3f} | "
         + ("n/a" if s["cost_per_1m_tokens_at_max_users"] is None else f"${s['cost_per_1m_tokens_at_max_users']:,.3f}")),
    ])  # fmt: skip
    section(f"Training on {gpus} × {hw['name']} at MFU {i['mfu']:.0%}", [
        ("Chinchilla tokens (20 / param)", f"{t['chinchilla_tokens']:.4g}"),
        ("FLOPs: 6ND | 3 × forward", f"{t['flops_6nd']:.4g} | {t['flops_exact']:.4g}"),
        ("time", duration(t["seconds"])),
        ("GPU-hours | cost", f"{t['gpu_hours']:,.0f} | ${t['cost']:,.0f}"),
    ])  # fmt: skip
    lines.extend(f"warning: {w}" for w in result["warnings"])
    return "\n".join(lines)
