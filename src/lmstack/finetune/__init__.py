"""Post-training methods plugged into the trainer: LoRA/DoRA adapters (and PEFT's folder format)."""

from lmstack.finetune.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
    trainable_parameters,
    unload_lora,
    unmerge_lora,
)

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "apply_lora",
    "load_adapter",
    "lora_state_dict",
    "merge_lora",
    "save_adapter",
    "trainable_parameters",
    "unload_lora",
    "unmerge_lora",
]
