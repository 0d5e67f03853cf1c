"""Transformer arithmetic: every number from a `ModelConfig`, without building the model.

`analyze(config, hardware=..., batch=..., context=...)` returns one nested dict (the JSON of
`lmstack calc --json`); the modules hold the pure functions it composes, each with its definition:

* `params`     exact parameter counts by component (total, embedding, non-embedding, active);
* `flops`      matmul FLOPs of a forward pass (2 per multiply-add; full s² or causal attention);
* `kv_cache`   KV-cache bytes per token / sequence / batch (MHA, GQA, MQA, sliding window);
* `memory`     weights per dtype (incl. NF4, GGUF Q4_0), training state, ZeRO, activations, LoRA;
* `throughput` roofline decode/prefill speed, crossover batch, serving capacity, training time;
* `hardware`   accelerator presets (dense BF16 peaks, bandwidth, capacity in GiB).
"""

from lmstack.arith.flops import (
    ForwardFlops,
    attended_pairs,
    decode_flops_per_token,
    forward_flops,
    forward_per_token,
    seed_attention_layer_flops,
    training_flops_6nd,
    training_flops_exact,
)
from lmstack.arith.hardware import GB, GIB, HARDWARE, Hardware, get_hardware
from lmstack.arith.kv_cache import KVCacheSize, kv_cache
from lmstack.arith.memory import (
    BITS,
    activation_bytes,
    bytes_per_element,
    korthikanti_layer_bytes,
    lora_memory,
    lora_params,
    sharded_training_bytes,
    training_bytes_per_param,
    weights_bytes,
)
from lmstack.arith.params import LayerParams, ParamCounts, approx_12ld2, count_params
from lmstack.arith.report import analyze, format_report
from lmstack.arith.throughput import (
    chinchilla_tokens,
    cost_per_million_tokens,
    crossover_batch,
    decode_estimate,
    decode_tokens_per_s,
    max_users,
    prefill_seconds,
    train_seconds,
)

__all__ = [
    "BITS",
    "GB",
    "GIB",
    "HARDWARE",
    "ForwardFlops",
    "Hardware",
    "KVCacheSize",
    "LayerParams",
    "ParamCounts",
    "activation_bytes",
    "analyze",
    "approx_12ld2",
    "attended_pairs",
    "bytes_per_element",
    "chinchilla_tokens",
    "cost_per_million_tokens",
    "count_params",
    "crossover_batch",
    "decode_estimate",
    "decode_flops_per_token",
    "decode_tokens_per_s",
    "format_report",
    "forward_flops",
    "forward_per_token",
    "get_hardware",
    "kv_cache",
    "korthikanti_layer_bytes",
    "lora_memory",
    "lora_params",
    "max_users",
    "prefill_seconds",
    "seed_attention_layer_flops",
    "sharded_training_bytes",
    "train_seconds",
    "training_bytes_per_param",
    "training_flops_6nd",
    "training_flops_exact",
    "weights_bytes",
]
