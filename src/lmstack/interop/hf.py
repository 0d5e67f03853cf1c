"""Load and save Hugging Face checkpoint folders: `config.json` + `*.safetensors` (+ index when sharded).

Each family's weight names are DATA: rows of (our names, Hugging Face names, transform), with `{i}` for
the layer and `{e}` for the expert. One loader and one saver read every table. A row whose own tensors
the model lacks (a bias the config turns off, `lm_head` when tied) is skipped, so one table serves
every variant of a family. Transforms, each a pair (to ours, to theirs):

  same       one tensor each side
  transpose  GPT-2's Conv1D stores (in, out); our Linear stores (out, in)
  split      one HF tensor holding several of ours stacked on rows, in order (Phi-3's fused
             `qkv_proj` -> q, k, v and `gate_up_proj` -> gate, up; GPT-2's `c_attn.bias`)
  split_t    transpose, then split (GPT-2's Conv1D `c_attn.weight` -> q, k, v)
  experts    one HF tensor stacked over experts (E, k*rows, cols) <-> k of ours per expert
             (transformers 5's fused Mixtral `experts.gate_up_proj`, `experts.down_proj`)

Our side is always one `nn.Linear` per projection (attention `q`, `k`, `v`, `o`; MLP `gate`, `up`,
`down`), so fused HF tensors are split on load and concatenated on save.

A tensor a config has but no row names (configs the family's class cannot express) is stored as
`lmstack.<our name>`. A family may list several layouts; loading takes the first whose names the checkpoint holds (Mixtral:
the per-expert `block_sparse_moe.experts.{e}.w1/w2/w3` that real checkpoints and transformers 5's
`save_pretrained` write, or the fused in-memory names), saving writes the first.

A quantized model (`lmstack.compress`) saves each `QuantLinear`'s tensors (`qweight`, `scales`, ...)
under its HF module's name and its scheme as config.json's `quantization_config`; loading rebuilds
those modules on the meta-built model first, so the same mapping assigns their tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmstack.atomic import replace_dir
from lmstack.compress.linear import QUANT_TENSORS
from lmstack.compress.swap import prepare_quantized, quantization_config
from lmstack.config import ModelConfig
from lmstack.errors import InputError
from lmstack.interop.hf_config import (
    config_from_hf,
    config_to_hf,
    eos_token_id_field,
    hf_incompatibilities,
    read_config_json,
)
from lmstack.model import Transformer, build_model

Row = tuple[tuple[str, ...], tuple[str, ...], str]


def _linear(ours: str, theirs: str, transform: str = "same") -> list[Row]:
    """Weight and bias rows of one Linear (the bias row drops out when the model has none), and the
    rows of its quantized tensors (`qweight`, `scales`, ...; only a quantized model has them), stored
    in our layout under the HF module's name."""
    return [
        ((f"{ours}.weight",), (f"{theirs}.weight",), transform),
        ((f"{ours}.bias",), (f"{theirs}.bias",), "same"),
        *[((f"{ours}.{t}",), (f"{theirs}.{t}",), "same") for t in QUANT_TENSORS],
    ]


def _norm(ours: str, theirs: str) -> list[Row]:
    return _linear(ours, theirs)


def _fused(ours: tuple[str, ...], theirs: str, transform: str = "split") -> list[Row]:
    """Weight and bias rows of one HF Linear holding several of ours stacked on rows (bias: split only)."""
    return [
        (tuple(f"{o}.weight" for o in ours), (f"{theirs}.weight",), transform),
        (tuple(f"{o}.bias" for o in ours), (f"{theirs}.bias",), "split"),
    ]


_L, _B = "model.layers.{i}", "blocks.{i}"
_LLAMA_TOP: list[Row] = [
    (("tok_emb.weight",), ("model.embed_tokens.weight",), "same"),
    *_norm("norm", "model.norm"),
    *_linear("lm_head", "lm_head"),
]
_LLAMA_ATTN: list[Row] = [
    *_norm(f"{_B}.attn_norm", f"{_L}.input_layernorm"),
    *_linear(f"{_B}.attn.q", f"{_L}.self_attn.q_proj"),
    *_linear(f"{_B}.attn.k", f"{_L}.self_attn.k_proj"),
    *_linear(f"{_B}.attn.v", f"{_L}.self_attn.v_proj"),
    *_linear(f"{_B}.attn.o", f"{_L}.self_attn.o_proj"),
    *_norm(f"{_B}.mlp_norm", f"{_L}.post_attention_layernorm"),
]
_LLAMA_MLP: list[Row] = [
    *_linear(f"{_B}.mlp.gate", f"{_L}.mlp.gate_proj"),
    *_linear(f"{_B}.mlp.up", f"{_L}.mlp.up_proj"),
    *_linear(f"{_B}.mlp.down", f"{_L}.mlp.down_proj"),
]
_LLAMA = _LLAMA_TOP + _LLAMA_ATTN + _LLAMA_MLP

_MIXTRAL_PER_EXPERT = _LLAMA_TOP + _LLAMA_ATTN + [
    ((f"{_B}.mlp.router.weight",), (f"{_L}.block_sparse_moe.gate.weight",), "same"),
    ((f"{_B}.mlp.experts.{{e}}.gate.weight",), (f"{_L}.block_sparse_moe.experts.{{e}}.w1.weight",), "same"),
    ((f"{_B}.mlp.experts.{{e}}.down.weight",), (f"{_L}.block_sparse_moe.experts.{{e}}.w2.weight",), "same"),
    ((f"{_B}.mlp.experts.{{e}}.up.weight",), (f"{_L}.block_sparse_moe.experts.{{e}}.w3.weight",), "same"),
]  # fmt: skip
_MIXTRAL_FUSED = _LLAMA_TOP + _LLAMA_ATTN + [
    ((f"{_B}.mlp.router.weight",), (f"{_L}.mlp.gate.weight",), "same"),
    ((f"{_B}.mlp.experts.{{e}}.gate.weight", f"{_B}.mlp.experts.{{e}}.up.weight"), (f"{_L}.mlp.experts.gate_up_proj",), "experts"),
    ((f"{_B}.mlp.experts.{{e}}.down.weight",), (f"{_L}.mlp.experts.down_proj",), "experts"),
]  # fmt: skip

_PHI3 = _LLAMA_TOP + [
    *_norm(f"{_B}.attn_norm", f"{_L}.input_layernorm"),
    (
        (f"{_B}.attn.q.weight", f"{_B}.attn.k.weight", f"{_B}.attn.v.weight"),
        (f"{_L}.self_attn.qkv_proj.weight",),
        "split",
    ),
    ((f"{_B}.attn.o.weight",), (f"{_L}.self_attn.o_proj.weight",), "same"),
    *_norm(f"{_B}.mlp_norm", f"{_L}.post_attention_layernorm"),
    ((f"{_B}.mlp.gate.weight", f"{_B}.mlp.up.weight"), (f"{_L}.mlp.gate_up_proj.weight",), "split"),
    ((f"{_B}.mlp.down.weight",), (f"{_L}.mlp.down_proj.weight",), "same"),
]

_H = "transformer.h.{i}"
_GPT2 = [
    (("tok_emb.weight",), ("transformer.wte.weight",), "same"),
    (("pos_emb.weight",), ("transformer.wpe.weight",), "same"),
    *_norm(f"{_B}.attn_norm", f"{_H}.ln_1"),
    *_fused((f"{_B}.attn.q", f"{_B}.attn.k", f"{_B}.attn.v"), f"{_H}.attn.c_attn", "split_t"),
    *_linear(f"{_B}.attn.o", f"{_H}.attn.c_proj", "transpose"),
    *_norm(f"{_B}.mlp_norm", f"{_H}.ln_2"),
    *_linear(f"{_B}.mlp.up", f"{_H}.mlp.c_fc", "transpose"),
    *_linear(f"{_B}.mlp.down", f"{_H}.mlp.c_proj", "transpose"),
    *_norm("norm", "transformer.ln_f"),
    *_linear("lm_head", "lm_head"),
]


@dataclass(frozen=True)
class WeightMap:
    layouts: tuple[list[Row], ...]  # the first is what we write
    base_prefix: str  # prefix of the base model's tensors; checkpoints of the bare base model omit it
    ignore: str = r"(^|\.)rotary_emb\.inv_freq$"  # tensors some checkpoints carry that hold no weights


WEIGHT_MAPS: dict[str, WeightMap] = {
    "gpt2": WeightMap((_GPT2,), "transformer.", r"(\.attn\.(masked_)?bias|(^|\.)rotary_emb\.inv_freq)$"),
    "llama": WeightMap((_LLAMA,), "model."),
    "mistral": WeightMap((_LLAMA,), "model."),
    "mixtral": WeightMap((_MIXTRAL_PER_EXPERT, _MIXTRAL_FUSED), "model."),
    "qwen2": WeightMap((_LLAMA,), "model."),
    "phi3": WeightMap((_PHI3,), "model."),
    "gemma": WeightMap((_LLAMA,), "model."),
}


# ---- transforms: (to ours, to theirs), each from a list of tensors to a list of tensors -----------
def _experts_to_ours(theirs: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    # (E, k*rows, cols) -> E*k tensors (rows, cols), expert-major
    return [part for expert in theirs[0].unbind(0) for part in expert.chunk(k, dim=0)]


def _experts_to_hf(ours: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    return [torch.stack([torch.cat(ours[e : e + k], dim=0) for e in range(0, len(ours), k)])]


def _split(tensor: torch.Tensor, rows: tuple[int, ...]) -> list[torch.Tensor]:
    # parts are copied: views of one storage would make the parameters alias each other, which
    # safetensors refuses to save
    return [part.clone(memory_format=torch.contiguous_format) for part in tensor.split(rows, dim=0)]


TRANSFORMS: dict[str, tuple[Callable[..., list[torch.Tensor]], Callable[..., list[torch.Tensor]]]] = {
    "same": (lambda t, n: t, lambda t, n: t),
    "transpose": (lambda t, n: [t[0].t()], lambda t, n: [t[0].t()]),
    "split": (lambda t, n: _split(t[0], n), lambda t, n: [torch.cat(t, dim=0)]),
    "split_t": (lambda t, n: _split(t[0].t(), n), lambda t, n: [torch.cat(t, dim=0).t()]),
    "experts": (_experts_to_ours, _experts_to_hf),
}


@dataclass(frozen=True)
class Mapping:
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    transform: str
    arg: Any  # our tensors' row counts for `split`/`split_t`; the number of our tensors per HF tensor otherwise

    def to_ours(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return TRANSFORMS[self.transform][0](tensors, self.arg)

    def to_hf(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return TRANSFORMS[self.transform][1](tensors, self.arg)


def expand(rows: list[Row], config: ModelConfig, our_shapes: dict[str, torch.Size]) -> list[Mapping]:
    """Concrete name mappings for a model: one per layer (and expert), only for tensors it has.

    A tensor no row covers (only in configs the family's class cannot express, e.g. LayerNorm biases
    in a Llama) is stored under `lmstack.<our name>`, so our own checkpoints always round-trip."""
    mappings = []
    for ours_t, theirs_t, transform in rows:
        layers = range(config.n_layers) if any("{i}" in s for s in ours_t + theirs_t) else [0]
        per_expert_hf = any("{e}" in s for s in theirs_t)
        experts = range(config.n_experts) if any("{e}" in s for s in ours_t) else [0]
        for i in layers:
            if per_expert_hf:  # one mapping per expert
                groups = [
                    ([s.format(i=i, e=e) for s in ours_t], [s.format(i=i, e=e) for s in theirs_t])
                    for e in experts
                ]
            else:  # one HF tensor for all experts: ours listed expert-major
                ours = [s.format(i=i, e=e) for e in experts for s in ours_t]
                groups = [(ours, [s.format(i=i) for s in theirs_t])]
            for ours, theirs in groups:
                if not all(name in our_shapes for name in ours):
                    continue
                split = transform in ("split", "split_t")
                arg = tuple(our_shapes[n][0] for n in ours) if split else len(ours_t)
                mappings.append(Mapping(tuple(ours), tuple(theirs), transform, arg))
    covered = {name for m in mappings for name in m.ours}
    mappings += [Mapping((n,), (f"lmstack.{n}",), "same", 1) for n in our_shapes if n not in covered]
    return mappings


# ---- loading ----------------------------------------------------------------------------------
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def checkpoint_dtype(config_json: dict[str, Any]) -> torch.dtype:
    """The dtype a config.json records (`dtype` in transformers 5, `torch_dtype` in 4), float32 if absent."""
    name = config_json.get("dtype") or config_json.get("torch_dtype") or "float32"
    if isinstance(name, str) and name.startswith("torch."):
        name = name[len("torch.") :]
    if name not in _DTYPES:
        raise InputError(f"config.json dtype {name!r} is not supported — use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _weight_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, from the shard index or every `*.safetensors` of the folder."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"{index_path}: not a valid shard index ({exc!r}) — re-download or re-save it"
            ) from None
        files = {name: folder / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise InputError(
                    f"{file}: shard listed in {index_path.name} is missing — re-download the checkpoint"
                )
        return files
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        has_bin = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
        hint = " (pickled .bin/.pt weights are not read: re-save them as safetensors)" if has_bin else ""
        raise InputError(
            f"{folder}: no *.safetensors weights{hint} — save the model with safetensors into this folder"
        )
    files = {}
    for shard in shards:
        with _open_safetensors(shard) as handle:
            files.update(dict.fromkeys(handle.keys(), shard))
    return files


@contextlib.contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error type for a truncated or corrupt file
        raise InputError(
            f"{path}: not a readable safetensors file ({exc}) — the file is truncated or corrupt; re-download or re-save it"
        ) from None
    with handle:
        yield handle


def _choose_layout(wmap: WeightMap, config: ModelConfig, our_shapes: dict, names: set[str]) -> list[Mapping]:
    best, best_missing = None, None
    for rows in wmap.layouts:
        mappings = expand(rows, config, our_shapes)
        missing = [n for m in mappings for n in m.theirs if n not in names]
        if not missing:
            return mappings
        if best_missing is None or len(missing) < len(best_missing):
            best, best_missing = mappings, missing
    assert best is not None and best_missing is not None
    shown = ", ".join(best_missing[:5]) + (
        f" (and {len(best_missing) - 5} more)" if len(best_missing) > 5 else ""
    )
    raise InputError(
        f"checkpoint lacks tensor(s) {shown} that its {config.family} config needs — the weights do not match "
        "config.json; re-download or re-save the checkpoint"
    )


def from_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    attn_impl: str = "sdpa",
    device: str | torch.device = "cpu",
) -> Transformer:
    """Load a Hugging Face-format folder (ours or `transformers`') of a supported family.

    `dtype=None` keeps the dtype config.json records (float32 when absent). The model is built on the
    meta device and the checkpoint's tensors are assigned to it, so nothing is initialised twice and
    peak memory stays near one copy of the weights. Returned in eval mode, like `transformers`.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(
            f"{folder}: no such checkpoint folder — pass a folder holding config.json and *.safetensors"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputError(
            f"{config_path}: missing — a checkpoint folder needs config.json next to its *.safetensors"
        )
    raw, _ = read_config_json(config_path)
    config = _with_generation_ids(config_from_hf(config_path), folder, raw)
    dtype = dtype or checkpoint_dtype(raw)
    model = build_model(config, device="meta", attn_impl=attn_impl)
    if "quantization_config" in raw:  # a checkpoint `lmstack quantize` wrote
        prepare_quantized(model, raw["quantization_config"], dtype=dtype)
    files = _weight_index(folder)
    handles: dict[Path, Any] = {}
    with contextlib.ExitStack() as stack:

        def handle(name: str) -> Any:
            file = files[name]
            if file not in handles:
                handles[file] = stack.enter_context(_open_safetensors(file))
            return handles[file]

        state = _state_from_hf(
            model,
            _normalise_names(files, WEIGHT_MAPS[config.family], config),
            shape_of=lambda name: _tensor_shape(handle(name), name, files[name]),
            read=lambda name: _cast(_read_tensor(handle(name), name, files[name]), device, dtype),
            where=lambda name: files[name].name,
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_hf_state_dict(model: Transformer, tensors: dict[str, torch.Tensor], *, assign: bool = False) -> None:
    """Load tensors under the family's Hugging Face names (what `hf_state_dict` returns, or a
    `transformers` model's `state_dict()`) into `model`, in place. Every tensor the model needs must be
    there with the shape its config implies, and none may be left over (`InputError` otherwise).
    `assign=True` adopts the tensors as the parameters (a model built on the meta device)."""
    config = model.config
    names = _normalise_names(tensors, WEIGHT_MAPS[config.family], config)
    state = _state_from_hf(
        model,
        names,
        shape_of=lambda name: tuple(tensors[name].shape),
        read=lambda name: tensors[name],
        where=lambda name: "state dict",
    )
    model.load_state_dict(state, strict=True, assign=assign)


def _state_from_hf(
    model: Transformer,
    names: dict[str, str],
    *,
    shape_of: Callable[[str], tuple[int, ...]],
    read: Callable[[str], torch.Tensor],
    where: Callable[[str], str],
) -> dict[str, torch.Tensor]:
    """Our state dict from HF tensors: `names` maps canonical HF names to the source's names, which
    `shape_of` and `read` take; every shape is checked before its tensor is read."""
    config = model.config
    wmap = WEIGHT_MAPS[config.family]
    meta = {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in model.state_dict().items()}
    mappings = _choose_layout(wmap, config, {n: t.shape for n, t in meta.items()}, set(names))
    used = {n for m in mappings for n in m.theirs}
    unused = sorted(n for n in names if n not in used and not re.search(wmap.ignore, n))
    if unused:
        raise InputError(
            f"checkpoint tensor(s) {', '.join(unused[:5])} have no place in the {config.family} model config.json "
            "describes (e.g. a bias the config turns off) — fix config.json or re-save the checkpoint"
        )
    state: dict[str, torch.Tensor] = {}
    for mapping in mappings:
        # the HF shapes the config implies, computed by the save transform on meta tensors (no memory)
        expected = mapping.to_hf([meta[n] for n in mapping.ours])
        tensors = []
        for name, want in zip(mapping.theirs, expected):
            shape = shape_of(names[name])
            if shape != tuple(want.shape):
                raise InputError(
                    f"{where(names[name])}: tensor {names[name]} has shape {shape}, but config.json implies "
                    f"{tuple(want.shape)} — the weights do not match config.json"
                )
            tensors.append(read(names[name]))
        for name, tensor in zip(mapping.ours, mapping.to_ours(tensors)):
            state[name] = tensor.contiguous()
    return state


def _cast(tensor: torch.Tensor, device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Float tensors to the load dtype; integer ones (quantized weights) keep theirs."""
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)


def _tensor_shape(handle: Any, name: str, file: Path) -> tuple[int, ...]:
    try:
        return tuple(handle.get_slice(name).get_shape())
    except Exception as exc:  # e.g. a shard index naming a tensor its file lacks
        raise InputError(
            f"{file}: cannot find tensor {name} ({exc}) — re-download or re-save the checkpoint"
        ) from None


def _read_tensor(handle: Any, name: str, file: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except Exception as exc:  # a corrupt payload surfaces only when read
        raise InputError(
            f"{file}: cannot read tensor {name} ({exc}) — re-download or re-save the checkpoint"
        ) from None


def _normalise_names(files: Iterable[str], wmap: WeightMap, config: ModelConfig) -> dict[str, str]:
    """Canonical HF name -> name in the file. Checkpoints of the bare base model (the original GPT-2's
    `h.0.attn...`, `wte.weight`) lack the prefix the LM-head class adds; we add it back."""
    has_prefix = any(n.startswith(wmap.base_prefix) for n in files)
    names = {}
    for name in files:
        keep = has_prefix or name == "lm_head.weight" or name.startswith("lmstack.")
        canonical = name if keep else wmap.base_prefix + name
        if config.tie_embeddings and canonical == "lm_head.weight":
            continue  # some tied checkpoints store the head anyway; it is the embedding
        names[canonical] = name
    return names


def _with_generation_ids(config: ModelConfig, folder: Path, raw: dict[str, Any]) -> ModelConfig:
    """Fill token ids config.json leaves out from generation_config.json (where the EOS id lives)."""
    path = folder / "generation_config.json"
    if "lmstack" in raw or not path.is_file():
        return config
    try:
        gen = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return config
    updates: dict[str, Any] = {}
    for ours, theirs in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
        values = gen.get(theirs)
        values = values if isinstance(values, list) else [values]
        values = [v for v in values if isinstance(v, int) and 0 <= v < config.vocab_size]
        if values and getattr(config, ours) is None:
            updates[ours] = values[0]
        if ours == "eos_id" and values:  # generate stops at every EOS id either file lists
            primary = updates.get("eos_id", config.eos_id)
            extra = tuple(dict.fromkeys(t for t in (*config.extra_eos_ids, *values) if t != primary))
            if extra != config.extra_eos_ids:
                updates["extra_eos_ids"] = extra
    return dataclasses.replace(config, **updates) if updates else config


# ---- saving -----------------------------------------------------------------------------------
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under the family's Hugging Face names (first layout), contiguous."""
    config = model.config
    ours = {name: t.detach() for name, t in model.state_dict().items()}
    mappings = expand(WEIGHT_MAPS[config.family].layouts[0], config, {n: t.shape for n, t in ours.items()})
    out: dict[str, torch.Tensor] = {}
    for mapping in mappings:
        for name, tensor in zip(mapping.theirs, mapping.to_hf([ours[n] for n in mapping.ours])):
            out[name] = _own_storage(tensor.contiguous())
    return out


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    # a view into a larger tensor (q, k, v fused for decoding) is copied: safetensors refuses
    # tensors that share memory
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole or tensor.device.type == "meta" else tensor.clone()


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_pretrained(
    model: Transformer,
    path: str | Path,
    *,
    tokenizer: Any | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    generation: dict[str, Any] | None = None,
) -> Path:
    """Write a folder `transformers` loads: config.json (+ our `lmstack` block), model.safetensors
    (sharded with model.safetensors.index.json past `max_shard_bytes`), generation_config.json (token
    ids, plus the sampling fields in `generation`, e.g. `{"do_sample": True, "temperature": 0.7}`) and,
    when given, the tokenizer's files. Atomic: written to `<path>.tmp/` and renamed into place."""
    if max_shard_bytes <= 0:
        raise InputError(f"max_shard_bytes must be positive, got {max_shard_bytes} — use e.g. 5 * 2**30")
    config: ModelConfig = model.config
    problems = hf_incompatibilities(config)
    if problems:
        warnings.warn(
            f"transformers' {config_to_hf(config)['architectures'][0]} cannot express this config "
            f"({'; '.join(problems)}); lmstack reloads it exactly, transformers' logits will differ",
            stacklevel=2,
        )
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        tensors = hf_state_dict(model)
        dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
        hf_config = config_to_hf(config)
        hf_config["dtype"] = hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
        quantized = quantization_config(model)
        if quantized is not None:
            hf_config["quantization_config"] = quantized
        _write_json(tmp / "config.json", hf_config)
        _write_weights(tmp, tensors, max_shard_bytes)
        _write_json(
            tmp / "generation_config.json", {**_generation_config(config, tokenizer), **(generation or {})}
        )
        if tokenizer is not None:
            tokenizer.save(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _generation_config(config: ModelConfig, tokenizer: Any | None) -> dict[str, Any]:
    eos = eos_token_id_field(config) if config.eos_id is not None else getattr(tokenizer, "eos_id", None)
    return {"bos_token_id": config.bos_id, "eos_token_id": eos, "pad_token_id": config.pad_id}


def _write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(
        folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
