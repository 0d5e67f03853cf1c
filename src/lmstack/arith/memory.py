"""Memory: weights per dtype, training state, ZeRO/FSDP sharding, activations, LoRA and QLoRA.

All results are bytes (ints or floats); the report prints them in GB (1e9) and GiB (2**30), labelled.

Weights. `fp32`/`bf16`/`fp16` store every parameter at 4/2/2 bytes. The quantised formats store
only the blocks' linear weight matrices in low precision and keep embeddings, LM head, norms, biases
and MoE routers in 16-bit. That split is our stated convention; real files differ at the margins
(bitsandbytes also quantises MoE routers; llama.cpp also quantises the token embedding and keeps the
output matrix at a higher-precision type). The formats:
`int8`/`fp8` = 8 bits and `int4` = 4 bits per weight (scales not counted), `nf4` = 4 + 8/64 + 32/(64·256)
bits (QLoRA's NormalFloat4 with double quantisation: an 8-bit scale per 64 weights and an fp32
constant per 256 scales), `q4_0` = GGUF's 18 bytes per block of 32 (fp16 scale + 32 nibbles).

Training state per parameter, mixed-precision AdamW (ZeRO's 16 B/param): bf16 weight 2
+ bf16 gradient 2 + fp32 master weight 4 + Adam m 4 + v 4. `training_bytes` is exactly this;
activations are reported separately. Other optimizers change the last term: AdamW 8-bit 2 B, SGD with
momentum 4 B, plain SGD 0 B.

Sharding over N data-parallel GPUs (Rajbhandari et al. 2020, ZeRO): DDP replicates everything;
ZeRO-1 shards optimizer state (master weights + moments); ZeRO-2 also gradients; ZeRO-3 (= FSDP
FULL_SHARD) also the weights.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", §4): 16-bit activations, no tensor/sequence parallelism, the tensors autograd keeps per
block. For a GPT block with dropout they total s·b·h·(34 + 5·a·s/h) bytes; we generalise the same
accounting to GQA (k, v of kv_dim), gated MLPs (gate, up, act(gate), product: 4 tensors of d_ff),
MoE (k expert copies) and no dropout (no masks, no dropout outputs). `selective` recomputation (and
FlashAttention, which never stores the s² matrices) drops the s² terms; `full` checkpointing keeps
only each block's input (2·s·b·d) plus one block rebuilt during its backward. The head adds its input
and fp32 logits for the loss (4·s·b·V, §4.3). It is an estimate: lmstack's eager model saves
1.2–1.5× this per block (fp32 norm internals, RoPE tables, pre-softmax scores; see the tests).
"""

from __future__ import annotations

import math

from lmstack.arith.params import ParamCounts, count_params
from lmstack.config import ModelConfig
from lmstack.errors import InputError

BITS = {
    "fp32": 32.0,
    "bf16": 16.0,
    "fp16": 16.0,
    "fp8": 8.0,
    "int8": 8.0,
    "int4": 4.0,
    "nf4": 4 + 8 / 64 + 32 / (64 * 256),
    "q4_0": 18 * 8 / 32,
}
FULL_PRECISION = ("fp32", "bf16", "fp16")
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "sgd_momentum": 4, "sgd": 0}
SHARDING = ("ddp", "zero1", "zero2", "zero3")
CHECKPOINTING = ("none", "selective", "full")


def bytes_per_element(dtype: str) -> float:
    if dtype not in BITS:
        raise InputError(f"unknown dtype {dtype!r} — use one of {', '.join(BITS)}")
    return BITS[dtype] / 8


def weights_bytes(config: ModelConfig | ParamCounts, dtype: str = "bf16") -> int:
    """Bytes to store the weights; quantised formats leave non-linear parts in 16-bit (module doc)."""
    p = config if isinstance(config, ParamCounts) else count_params(config)
    per = bytes_per_element(dtype)
    if dtype in FULL_PRECISION:
        return math.ceil(p.total * per)
    return math.ceil(p.quantisable * per) + 2 * (p.total - p.quantisable)


def training_bytes_per_param(optimizer: str = "adamw", mixed_precision: bool = True) -> int:
    """Weights + gradients + optimizer state per parameter: 16 for mixed-precision AdamW (module doc)."""
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise InputError(f"unknown optimizer {optimizer!r} — use one of {', '.join(OPTIMIZER_STATE_BYTES)}")
    state = OPTIMIZER_STATE_BYTES[optimizer]
    return (2 + 2 + 4 + state) if mixed_precision else (4 + 4 + state)


def sharded_training_bytes(
    n_params: int, n_gpus: int, stage: str, optimizer: str = "adamw", mixed_precision: bool = True
) -> float:
    """Per-GPU weights + gradients + optimizer state under DDP or ZeRO-1/2/3 (FSDP = ZeRO-3)."""
    if stage not in SHARDING:
        raise InputError(f"unknown sharding {stage!r} — use one of {', '.join(SHARDING)}")
    weight = grad = 2 if mixed_precision else 4
    state = training_bytes_per_param(optimizer, mixed_precision) - weight - grad  # master + moments
    n = n_gpus
    per_param = {
        "ddp": weight + grad + state,
        "zero1": weight + grad + state / n,
        "zero2": weight + (grad + state) / n,
        "zero3": (weight + grad + state) / n,
    }[stage]
    return n_params * per_param


# ---- activations ----------------------------------------------------------------------------------
def layer_activation_bytes(
    config: ModelConfig, batch: int, context: int, element_bytes: int = 2
) -> tuple[int, int]:
    """(bytes without s² terms, bytes of the s² attention terms) stored by one block for backward;
    activations of `element_bytes` each (2: 16-bit, 4: fp32 training), dropout masks 1 byte."""
    c, sb, a = config, context * batch, element_bytes
    dropout = c.dropout > 0
    d, q, kv, ff = c.d_model, c.q_dim, c.kv_dim, c.d_ff
    norms = 2 * a * sb * d  # each norm's input
    attention = a * sb * d + a * sb * (q + kv) + a * sb * kv + a * sb * q + (sb * d if dropout else 0)
    # input to qkv, Q and K for QKᵀ, V, input to o, output dropout mask
    mlp_tensors = 4 if c.gated_mlp else 2  # gate, up, act(gate), gate·up  |  pre-activation, activation
    expert = a * sb * d + mlp_tensors * a * sb * ff
    if c.is_moe:
        mlp = (
            a * sb * d + c.n_experts_per_token * expert + 4 * sb * c.n_experts
        )  # router in, k experts, fp32 logits
    else:
        mlp = expert
    mlp += sb * d if dropout else 0
    square = (
        batch * c.n_heads * context * context * ((2 * a + 1) if dropout else a)
    )  # softmax out (+ mask + dropout out)
    return norms + attention + mlp, square


def activation_bytes(
    config: ModelConfig, batch: int, context: int, checkpointing: str = "none", element_bytes: int = 2
) -> int:
    """Activation memory of a training step (module doc): `none`, `selective` or `full` recomputation,
    activations of `element_bytes` each (2 for 16-bit training, 4 for fp32)."""
    if checkpointing not in CHECKPOINTING:
        raise InputError(f"unknown checkpointing {checkpointing!r} — use one of {', '.join(CHECKPOINTING)}")
    c, sb, a = config, batch * context, element_bytes
    linear, square = layer_activation_bytes(c, batch, context, a)
    head = (
        a * sb * c.d_model + a * sb * c.d_model + 4 * sb * c.vocab_size
    )  # final norm in, head in, fp32 logits
    head += sb * c.d_model if c.dropout > 0 else 0  # embedding dropout mask
    if checkpointing == "none":
        blocks = c.n_layers * (linear + square)
    elif checkpointing == "selective":
        blocks = c.n_layers * linear
    else:
        blocks = c.n_layers * a * sb * c.d_model + linear + square
    return blocks + head


def korthikanti_layer_bytes(batch: int, context: int, d_model: int, n_heads: int) -> int:
    """The paper's per-layer formula for a GPT block with dropout: s·b·h·(34 + 5·a·s/h)."""
    s, b, h, a = context, batch, d_model, n_heads
    return 34 * s * b * h + 5 * a * s * s * b


# ---- LoRA / DoRA / QLoRA ---------------------------------------------------------------------------
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "router")
ALL_LINEAR = "all-linear"
ADAPTERS = ("none", "lora", "dora", "qlora")
EIGHT_BIT_BLOCK = 2048  # Dettmers et al. 2022: one fp32 absmax per 2048 quantised values
ADAPTER_BYTES_PER_PARAM = 4 + 4  # adapters train in fp32 (PEFT casts them up): weight + gradient


def resolve_lora_targets(config: ModelConfig, targets: tuple[str, ...] | str) -> tuple[str, ...]:
    """The layer names `targets` picks: `"all-linear"` is every linear layer but the LM head (PEFT's
    rule), so it includes an MoE router; `"q,v"` is read as ("q", "v")."""
    c = config
    present = [t for t in LORA_TARGETS if (t != "gate" or c.gated_mlp) and (t != "router" or c.is_moe)]
    if targets == ALL_LINEAR:
        return tuple(present)
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    bad = [t for t in targets if t not in present]
    if bad or not targets:
        raise InputError(
            f"bad LoRA targets {list(bad) or list(targets)} — this model's linear layers are "
            f"{', '.join(present)}, or use {ALL_LINEAR!r}"
        )
    return tuple(dict.fromkeys(targets))


def lora_params(
    config: ModelConfig, rank: int, targets: tuple[str, ...] | str = ("q", "v"), *, dora: bool = False
) -> int:
    """Trainable LoRA parameters: each targeted d_in × d_out matrix gets A (d_in × r) and B (r × d_out),
    and with DoRA a magnitude per output row (d_out).

    Default targets are q and v (Hu et al. 2021); alpha = 2r only scales the update and adds nothing.
    MLP targets apply to every expert of an MoE layer.
    """
    c = config
    if rank < 1:
        raise InputError(f"LoRA rank {rank} — use a rank >= 1")
    shapes = {
        "q": (c.d_model, c.q_dim),
        "k": (c.d_model, c.kv_dim),
        "v": (c.d_model, c.kv_dim),
        "o": (c.q_dim, c.d_model),
        "gate": (c.d_model, c.d_ff),
        "up": (c.d_model, c.d_ff),
        "down": (c.d_ff, c.d_model),
        "router": (c.d_model, c.n_experts),
    }
    per_layer = 0
    for t in resolve_lora_targets(c, targets):
        n_in, n_out = shapes[t]
        copies = max(c.n_experts, 1) if t in ("gate", "up", "down") else 1
        per_layer += copies * (rank * (n_in + n_out) + (n_out if dora else 0))
    return c.n_layers * per_layer


def optimizer_state_bytes_per_param(optimizer: str, block_size: int = EIGHT_BIT_BLOCK) -> float:
    """Optimizer state per trained parameter: AdamW's fp32 m and v are 8 B; AdamW 8-bit stores each
    moment in 1 byte plus one fp32 absmax per block of `block_size` (2 + 8/2048 B); SGD 4 or 0 B."""
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise InputError(f"unknown optimizer {optimizer!r} — use one of {', '.join(OPTIMIZER_STATE_BYTES)}")
    if optimizer == "adamw8bit":
        return 2 + 2 * 4 / block_size
    return float(OPTIMIZER_STATE_BYTES[optimizer])


def finetune_memory(
    config: ModelConfig,
    *,
    adapter: str = "lora",
    rank: int = 16,
    targets: tuple[str, ...] | str = ("q", "v"),
    optimizer: str = "adamw",
    batch: int = 1,
    context: int = 2048,
    checkpointing: str = "none",
    precision: str = "bf16",
    trainable_tokens: int = 0,
) -> dict[str, object]:
    """Memory to fine-tune `config`: full (`none`), LoRA, DoRA, or QLoRA (LoRA on an NF4 base).

    `trainable_tokens` rows of the embedding (and of an untied head) train beside an adapter, as PEFT's
    `trainable_token_indices`: `lmstack finetune` trains the ChatML tokens it adds to a base that had no
    chat template.

    `precision` is the compute dtype: `bf16`/`fp16` (mixed precision, the default) or `fp32`.
    Full fine-tuning trains every parameter (`training_bytes_per_param`: 16-bit weight and gradient
    plus an fp32 master, or fp32 weight and gradient). With an adapter the base is frozen in the
    compute dtype (NF4 for QLoRA, Dettmers et al. 2023, its other tensors in the compute dtype) and
    only the adapters train, in fp32: weight 4 + gradient 4 + optimizer state per parameter.
    Activations are the full model's (`activation_bytes`, an upper bound: a frozen linear layer need
    not keep its input) plus what the adapters keep: the fp32 r-dim A·x of each adapted matrix (B's
    gradient needs it) and, for DoRA, the fp32 d_out-dim W·x + sBA·x the magnitude's gradient needs.
    The loss adds its peak (`loss_peak_bytes`): when backward starts, the cross-entropy holds the fp32
    log-probabilities it saved, the gradient arriving at them and the gradient it returns to the
    logits — two s·b·V fp32 tensors beyond the logits `activation_bytes` counts.
    """
    if adapter not in ADAPTERS:
        raise InputError(f"unknown adapter {adapter!r} — use one of {', '.join(ADAPTERS)}")
    if precision not in FULL_PRECISION:
        raise InputError(f"unknown precision {precision!r} — use one of {', '.join(FULL_PRECISION)}")
    c = config
    p = count_params(c)
    state = optimizer_state_bytes_per_param(optimizer)
    element = int(bytes_per_element(precision))
    activations = activation_bytes(c, batch, context, checkpointing, element)
    if adapter == "none":
        # 16-bit weight and gradient + fp32 master, or fp32 weight and gradient
        weights_grads = p.total * ((2 + 2 + 4) if element < 4 else (4 + 4))
        optimizer_bytes = p.total * state
        result: dict[str, object] = {
            "adapter": adapter,
            "trainable_params": p.total,
            "base_weights_bytes": 0,
            "trained_weights_and_gradients_bytes": weights_grads,
        }
    else:
        picked = resolve_lora_targets(c, targets)
        dora = adapter == "dora"
        if trainable_tokens < 0:
            raise InputError(f"trainable_tokens must be >= 0, got {trainable_tokens}")
        rows = trainable_tokens * c.d_model * (1 if c.tie_embeddings else 2)
        trainable = lora_params(c, rank, picked, dora=dora) + rows
        out_dims = {"q": c.q_dim, "k": c.kv_dim, "v": c.kv_dim, "o": c.d_model, "gate": c.d_ff, "up": c.d_ff}
        out_dims |= {"down": c.d_model, "router": c.n_experts}
        matrices = sum(
            (c.n_experts_per_token if c.is_moe and t in ("gate", "up", "down") else 1) for t in picked
        )  # per token, only the k routed experts run
        tokens = batch * context
        layers_kept = 1 if checkpointing == "full" else c.n_layers
        extra = layers_kept * tokens * 4 * rank * matrices
        if dora:
            extra += layers_kept * tokens * 4 * sum(out_dims[t] for t in picked)
        activations += extra
        weights_grads = trainable * ADAPTER_BYTES_PER_PARAM
        optimizer_bytes = trainable * state
        result = {
            "adapter": adapter,
            "rank": rank,
            "alpha": 2 * rank,
            "targets": list(picked),
            "trainable_params": trainable,
            "base_weights_bytes": _frozen_base_bytes(p, adapter, precision),
            "trained_weights_and_gradients_bytes": weights_grads,
        }
    loss_peak = 2 * 4 * batch * context * c.vocab_size
    result |= {
        "trainable_fraction": result["trainable_params"] / p.total,
        "optimizer": optimizer,
        "optimizer_state_bytes": optimizer_bytes,
        "activations_bytes": activations,
        "loss_peak_bytes": loss_peak,
        "checkpointing": checkpointing,
        "precision": precision,
        "total_bytes": result["base_weights_bytes"]
        + weights_grads
        + optimizer_bytes
        + activations
        + loss_peak,
    }
    return result


def _frozen_base_bytes(p: ParamCounts, adapter: str, precision: str) -> int:
    """The frozen base: in the compute dtype, or (QLoRA) NF4 block matrices + the rest in the compute
    dtype."""
    if adapter != "qlora":
        return weights_bytes(p, precision)
    rest = (p.total - p.quantisable) * bytes_per_element(precision)
    return math.ceil(p.quantisable * bytes_per_element("nf4") + rest)


def lora_memory(
    config: ModelConfig, rank: int, targets: tuple[str, ...] | str = ("q", "v"), base_dtype: str = "bf16"
) -> dict[str, float]:
    """Frozen base weights in `base_dtype` (`nf4` = QLoRA) + adapters trained at 16 B/param
    (weight, gradient, fp32 master and AdamW moments, as for full training). Activations excluded."""
    p = count_params(config)
    targets = resolve_lora_targets(config, targets)
    trainable = lora_params(config, rank, targets)
    base = weights_bytes(p, base_dtype)
    adapters = trainable * training_bytes_per_param("adamw")
    return {
        "rank": rank,
        "alpha": 2 * rank,
        "targets": list(targets),
        "trainable_params": trainable,
        "trainable_fraction": trainable / p.total,
        "base_dtype": base_dtype,
        "base_weights_bytes": base,
        "adapter_training_bytes": adapters,
        "total_bytes": base + adapters,
    }
