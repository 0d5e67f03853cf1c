"""LoRA/DoRA inside the training loop: what a fine-tuning method does with adapters at each seam.

- `prepare`: freeze the model and inject adapters (`finetune.lora.apply_lora`);
- checkpoints: the checkpoint's weights are the adapters merged into a copy of the model (so the
  checkpoint folder is an ordinary model every command loads), and beside them `adapter/`, a PEFT
  LoRA folder whose tensor names are the Hugging Face module paths of interop's weight maps
  (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) and whose
  `base_model_name_or_path` is the base the run started from;
- new vocabulary rows (the ChatML tokens a base without a chat template gets) train as PEFT's
  `trainable_token_indices` (tokens.py), saved in the same adapter folder;
- resume: the frozen base comes from the run's starting model (its hash is checked by the method) and
  the adapters from `adapter/`, so training goes on exactly where it stopped.

QLoRA (`qlora=True`, finetune/qlora.py) is the same with the frozen base stored in NF4: the checkpoint's
weights are then the adapters merged into the decoded NF4 base, the base they were trained on, and
the adapter folder also holds `base_quantization.json`, so loading or merging it rebuilds that base.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from lmstack.errors import InputError
from lmstack.finetune.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraConfig,
    apply_lora,
    load_adapter,
    lora_layers,
    save_adapter,
    unload_lora,
)
from lmstack.finetune.tokens import (
    apply_token_rows,
    is_token_key,
    load_token_rows,
    peft_token_rows,
    unload_token_rows,
)

ADAPTER_DIR = "adapter"
ADAPTERS = ("none", "lora", "dora", "qlora")


def hf_module_names(model: nn.Module) -> dict[str, str]:
    """Our linear module paths -> the Hugging Face model's, from interop's weight map of the model's
    family (only layers stored one-to-one under a `.weight` name; fused HF tensors have no such path)."""
    from lmstack.compress.linear import QuantLinear
    from lmstack.finetune.qlora import QLoraLinear
    from lmstack.interop.hf import WEIGHT_MAPS, expand

    config = model.config
    shapes = {n: p.shape for n, p in model.state_dict().items()}
    # a layer stored in NF4 (QLoRA) has no `.weight` tensor; it keeps the float layer's path and name
    adapted = {path for path, m in model.named_modules() if isinstance(m, QLoraLinear)}
    for path, m in model.named_modules():
        if path in adapted or (isinstance(m, QuantLinear) and path.rpartition(".")[0] not in adapted):
            shapes[f"{path}.weight"] = torch.Size((m.out_features, m.in_features))
    out = {}
    for m in expand(WEIGHT_MAPS[config.family].layouts[0], config, shapes):
        if m.transform == "same" and len(m.ours) == 1 and m.ours[0].endswith(".weight"):
            out[m.ours[0][: -len(".weight")]] = m.theirs[0][: -len(".weight")]
    return out


@dataclass(frozen=True)
class AdapterSetup:
    """Adapters for a fine-tuning method: None trains every weight. `token_ids`: vocabulary rows that
    train beside the adapters (new tokens the base never learnt)."""

    lora: LoraConfig | None = None
    base_path: str | None = None  # written into the PEFT folder's base_model_name_or_path
    qlora: bool = False  # store the frozen base in NF4 (QLoRA)
    token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.qlora and self.lora is None:
            raise InputError(
                "QLoRA trains adapters on the NF4 base — give a LoraConfig (adapter qlora, not none)"
            )

    def prepare(self, model: nn.Module, seed: int = 0) -> nn.Module:
        """Freeze `model` and inject the adapters, their A matrices drawn from `seed` (a run and its
        resume start from the same adapters)."""
        if self.lora is None:
            return model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.qlora:
                from lmstack.finetune.qlora import apply_qlora

                apply_qlora(model, self.lora)
            else:
                apply_lora(model, self.lora)
        if self.token_ids:
            apply_token_rows(model, self.token_ids)
        names = hf_module_names(model)
        unmapped = sorted(p for p in lora_layers(model) if p not in names)
        if unmapped:
            raise InputError(
                f"layer(s) {', '.join(unmapped[:3])} have no one-to-one Hugging Face name in the "
                f"{model.config.family} weight map, so a PEFT adapter could not name them — choose other "
                "--lora-targets"
            )
        return model

    def frozen_base(self, model: nn.Module) -> nn.Module:
        """The starting model as the adapted model sees it before training: its base stored in NF4
        under QLoRA, else unchanged (a DPO reference that equals the policy at step 0)."""
        if not self.qlora:
            return model
        from lmstack.finetune.qlora import quantize_base

        return quantize_base(model)

    def checkpoint_model(self, model: nn.Module) -> nn.Module:
        """A copy with the adapters merged in and plain linear layers (the trained model as a checkpoint)."""
        if self.lora is None:
            return model
        if self.qlora:
            from lmstack.finetune.qlora import merge_qlora

            return unload_token_rows(merge_qlora(copy.deepcopy(model)))
        return unload_token_rows(unload_lora(copy.deepcopy(model)))

    def save_files(self, model: nn.Module, folder: Path) -> None:
        if self.lora is not None:
            names = hf_module_names(model)
            tensors, config = peft_token_rows(model, names)
            save_adapter(
                model,
                folder / ADAPTER_DIR,
                base_model_name_or_path=self.base_path,
                name_map=names,
                extra_tensors=tensors,
                extra_config=config,
            )
            if self.qlora:
                from lmstack.finetune.qlora import write_base_quantization

                write_base_quantization(folder / ADAPTER_DIR)

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        """Resume: the adapters from `folder/adapter` (the frozen base is the run's starting model)."""
        if self.lora is None:
            from lmstack.train.checkpoint import load_model_weights

            load_model_weights(model, folder)
            return
        load_peft_folder(model, folder / ADAPTER_DIR)


def load_peft_folder(model: nn.Module, path: str | Path) -> nn.Module:
    """A PEFT LoRA/DoRA folder into `model` (in place): the adapters, and the trainable token rows when
    its config lists `trainable_token_indices`."""
    names = hf_module_names(model)
    load_adapter(model, path, name_map=names, skip=is_token_key)
    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    tensors = safetensors.torch.load_file(str(Path(path) / ADAPTER_WEIGHTS))
    return load_token_rows(model, tensors, config, names)


def lora_config_for(
    adapter: str,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: str = "q,v",
    rslora: bool = False,
) -> LoraConfig | None:
    """The `LoraConfig` an `--adapter none|lora|dora|qlora` choice means (None: full fine-tuning);
    QLoRA's adapters are LoRA's, on an NF4 base (`AdapterSetup.qlora`)."""
    if adapter not in ADAPTERS:
        raise InputError(f"unknown adapter {adapter!r} — use one of {', '.join(ADAPTERS)}")
    if adapter == "none":
        return None
    return LoraConfig(
        r=rank, alpha=alpha, dropout=dropout, targets=targets, rslora=rslora, use_dora=adapter == "dora"
    )


def _adapter_folder(adapter: str | Path) -> Path:
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise InputError(f"adapter folder not found: {path} — give a folder with adapter_config.json")
    return path


def _load_onto(model: str | Path, adapter: Path, dtype: torch.dtype | str | None) -> tuple[nn.Module, object]:
    """The base with the adapter folder's adapters (unmerged); a QLoRA adapter's base is first stored
    in NF4 exactly as in training: quantized from its float32 weights, then cast to `dtype`."""
    from lmstack.finetune.qlora import check_float_base, has_nf4_base, quantize_base
    from lmstack.interop.folders import load_model_and_tokenizer, resolve_model_dir

    if not has_nf4_base(adapter):
        base, tokenizer = load_model_and_tokenizer(model, dtype=dtype)
        load_peft_folder(base, adapter)
        return base, tokenizer
    check_float_base(resolve_model_dir(Path(model).expanduser()))
    base, tokenizer = load_model_and_tokenizer(model, dtype=torch.float32)
    load_peft_folder(base, adapter)
    quantize_base(base)  # keeps the loaded adapter tensors (DoRA magnitudes included)
    if dtype is not None:
        base.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return base, tokenizer


def load_with_adapter(
    model: str | Path, adapter: str | Path | None = None, *, dtype: torch.dtype | str | None = None
) -> tuple[nn.Module, object]:
    """A model and its tokenizer (`interop.folders.load_model_and_tokenizer`), with a PEFT LoRA/DoRA
    folder applied unmerged on top when `adapter` is given: what `--adapter DIR` means to every command.
    A QLoRA adapter (its folder holds `base_quantization.json`) runs on the NF4 base it was trained on."""
    from lmstack.interop.folders import load_model_and_tokenizer

    if adapter is None:
        return load_model_and_tokenizer(model, dtype=dtype)
    base, tokenizer = _load_onto(model, _adapter_folder(adapter), dtype)
    return base.eval(), tokenizer


def merge_adapter(model: str | Path, adapter: str | Path, out: str | Path, *, dtype: str = "fp32") -> Path:
    """Fold a PEFT LoRA/DoRA folder into its base model and save the result as an ordinary checkpoint
    folder (plain linear layers, the base's tokenizer) in `dtype` (fp32, bf16 or fp16).

    A QLoRA adapter is folded into the base it was trained on, the NF4-decoded weights
    dequant(nf4(W)) + sBA, not the float W: merged logits equal the adapter's on the NF4 base."""
    from lmstack.finetune.qlora import has_nf4_base, merge_qlora
    from lmstack.interop.hf import save_pretrained

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise InputError(f"unknown dtype {dtype!r} — use one of {', '.join(dtypes)}")
    path = _adapter_folder(adapter)
    base, tokenizer = _load_onto(model, path, torch.float32)  # merge in fp32, then cast
    merged = unload_token_rows(merge_qlora(base) if has_nf4_base(path) else unload_lora(base)).to(
        dtypes[dtype]
    )
    return save_pretrained(merged, Path(out).expanduser(), tokenizer=tokenizer)
