"""GGUF export and import (llama.cpp's single-file format), built on Hugging Face tensor names.

A GGUF file is a key-value header (architecture hyper-parameters, the tokenizer) and named tensors,
each in a ggml type (F32, F16, or a block format of `lmstack.quant.ggml`). The `gguf` package reads and
writes the container; the names, keys and encodings are ours, as DATA below, like `WEIGHT_MAPS` in
`interop.hf`:

  TENSOR_NAMES   HF name -> GGUF name per family ({i} = layer)
  HPARAM_KEYS    HF config.json key -> GGUF key (under "<arch>.") per family
  FILE_TYPES     the --type choices: llama.cpp's file-type id and default tensor type
  PRE_TOKENIZERS our pre-tokenizer regex -> the `tokenizer.ggml.pre` name llama.cpp knows

Two layout facts llama.cpp needs:
  - Llama's rotary embedding in llama.cpp rotates adjacent pairs (x0, x1), (x2, x3) ...; Hugging Face's
    rotates halves (x_j, x_{j+d/2}). So the rows of q and k (weights and biases) are permuted per head
    on export, pair-interleaving the halves, and back on import. Qwen2 uses llama.cpp's NEOX (halves)
    rope and needs no permutation.
  - GPT-2's Conv1D stores (in, out); GGUF stores every matrix as (out, in) rows.

`q4_k_m` follows llama.cpp's Q4_K_M mix: Q4_K by default; Q6_K for the output head (the embedding
when the head is tied) and for attn_v (GPT-2's fused attn_qkv) and ffn_down in the first and last eighth
of the layers and every third one between (checked against llama.cpp's own quantizer in the tests). A row width that is not a multiple of 256 falls
back as llama.cpp does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), to F16 when not a multiple of 32.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.errors import InputError
from lmstack.interop.hf_config import config_from_hf, config_to_hf, hf_incompatibilities
from lmstack.quant.ggml import GGML_BLOCKS, QK_K, ggml_dequantize, ggml_quantize
from lmstack.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN

# ---- data tables ---------------------------------------------------------------------------------
_L = "model.layers.{i}"
_LLAMA_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    f"{_L}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    f"{_L}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    **{f"{_L}.self_attn.{p}_proj.{k}": f"blk.{{i}}.attn_{p}.{k}" for p in "qkv" for k in ("weight", "bias")},
    **{f"{_L}.self_attn.o_proj.{k}": f"blk.{{i}}.attn_output.{k}" for k in ("weight", "bias")},
    **{f"{_L}.mlp.{p}_proj.{k}": f"blk.{{i}}.ffn_{p}.{k}" for p in ("gate", "up", "down") for k in ("weight", "bias")},
}  # fmt: skip
_H = "transformer.h.{i}"
_GPT2_NAMES = {
    "transformer.wte.weight": "token_embd.weight",
    "transformer.wpe.weight": "position_embd.weight",
    "transformer.ln_f.weight": "output_norm.weight",
    "transformer.ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
    **{f"{_H}.ln_1.{k}": f"blk.{{i}}.attn_norm.{k}" for k in ("weight", "bias")},
    **{f"{_H}.ln_2.{k}": f"blk.{{i}}.ffn_norm.{k}" for k in ("weight", "bias")},
    **{f"{_H}.attn.c_attn.{k}": f"blk.{{i}}.attn_qkv.{k}" for k in ("weight", "bias")},
    **{f"{_H}.attn.c_proj.{k}": f"blk.{{i}}.attn_output.{k}" for k in ("weight", "bias")},
    **{f"{_H}.mlp.c_fc.{k}": f"blk.{{i}}.ffn_up.{k}" for k in ("weight", "bias")},
    **{f"{_H}.mlp.c_proj.{k}": f"blk.{{i}}.ffn_down.{k}" for k in ("weight", "bias")},
}

# our family -> (GGUF architecture, tensor names, q/k rows permuted for llama.cpp's pairwise rope)
ARCHITECTURES: dict[str, tuple[str, dict[str, str], bool]] = {
    "llama": ("llama", _LLAMA_NAMES, True),
    "mistral": ("llama", _LLAMA_NAMES, True),  # llama.cpp runs Mistral as "llama"
    "qwen2": ("qwen2", _LLAMA_NAMES, False),
    "gpt2": ("gpt2", _GPT2_NAMES, False),
}
# GGUF architecture -> the family an imported file becomes
IMPORT_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}

_ROPE_KEYS = {
    "max_position_embeddings": "context_length",
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "head_dim": "attention.key_length",
}
HPARAM_KEYS: dict[str, dict[str, str]] = {
    "llama": _ROPE_KEYS,
    "qwen2": _ROPE_KEYS,
    "gpt2": {
        "n_positions": "context_length",
        "n_embd": "embedding_length",
        "n_layer": "block_count",
        "n_inner": "feed_forward_length",
        "n_head": "attention.head_count",
        "layer_norm_epsilon": "attention.layer_norm_epsilon",
    },
}
_FLOAT_KEYS = {"rms_norm_eps", "rope_theta", "layer_norm_epsilon"}
# the hyper-parameters an import cannot guess (the rest have llama.cpp's defaults)
_REQUIRED_KEYS = ("block_count", "embedding_length", "attention.head_count", "feed_forward_length")
_HF_ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
            "gpt2": ("GPT2LMHeadModel", "gpt2")}  # fmt: skip


@dataclass(frozen=True)
class FileType:
    ftype: int  # llama.cpp's `general.file_type` (enum llama_ftype)
    default: str  # the ggml type of a 2-D weight unless a rule says otherwise
    mix: bool = False  # the Q4_K_M rules for output / attn_v / ffn_down / attn_qkv


FILE_TYPES: dict[str, FileType] = {
    "f32": FileType(0, "F32"),
    "f16": FileType(1, "F16"),
    "q4_0": FileType(2, "Q4_0"),
    "q8_0": FileType(7, "Q8_0"),
    "q4_k_m": FileType(15, "Q4_K", mix=True),
}
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp: width not a multiple of 256

PRE_TOKENIZERS = {GPT2_PATTERN: "gpt-2", GPT4_PATTERN: "llama-bpe"}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


# ---- which type each tensor gets ----------------------------------------------------------------
def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], file_type: str, n_layers: int, has_output: bool) -> str:
    """The ggml type of GGUF tensor `name` (numpy shape (rows, cols)) in a file of `file_type`."""
    ft = FILE_TYPES[file_type]
    if len(shape) < 2 or name == "position_embd.weight":  # norms, biases, learned positions stay exact
        return "F32"
    if ft.default in ("F32", "F16"):
        return ft.default
    qtype = ft.default
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight" or (name == "token_embd.weight" and not has_output):
        qtype = "Q8_0" if qtype == "Q8_0" or shape[-1] % QK_K else "Q6_K"
    elif ft.mix and name.endswith(("attn_v.weight", "attn_qkv.weight", "ffn_down.weight")):
        qtype = "Q6_K" if _use_more_bits(layer, n_layers) else qtype
    if shape[-1] % GGML_BLOCKS[qtype][0]:
        qtype = _FALLBACK.get(qtype, qtype)
    if shape[-1] % GGML_BLOCKS[qtype][0]:
        qtype = "F16"
    return qtype


# ---- rope permutation ----------------------------------------------------------------------------
def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split rotary rows -> llama.cpp's interleaved pairs, per head: rows (h, 2, d/2) -> (h, d/2, 2)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- export --------------------------------------------------------------------------------------
def _check_exportable(config: Any, file_type: str) -> None:
    if file_type not in FILE_TYPES:
        raise InputError(f"GGUF type {file_type!r} is not supported — use one of {', '.join(FILE_TYPES)}")
    if config.family not in ARCHITECTURES:
        raise InputError(
            f"GGUF export of the {config.family!r} architecture is not supported — export one of "
            f"{', '.join(ARCHITECTURES)}, or save a Hugging Face folder instead"
        )
    problems = hf_incompatibilities(config)
    if config.position == "rope" and config.rope_scaling != "none":
        problems.append(f"RoPE scaling {config.rope_scaling!r}")
    if config.sliding_window is not None and config.sliding_window < config.max_seq_len:
        problems.append(f"a sliding window of {config.sliding_window} (llama.cpp's llama has none)")
    if config.n_experts:
        problems.append("mixture-of-experts layers")
    if problems:
        raise InputError(
            f"llama.cpp cannot run this {config.family} config ({'; '.join(problems)}) — export a standard "
            f"{config.family} config"
        )


def _pre_tokenizer(tokenizer: Any) -> str:
    name = PRE_TOKENIZERS.get(tokenizer.pattern)
    if name is None:
        raise InputError(
            "the tokenizer's pre-tokenizer regex is not one llama.cpp knows — train it with pattern "
            "'gpt2' or 'gpt4' to export GGUF"
        )
    if tokenizer.normalizer:
        raise InputError(
            f"llama.cpp's gpt2 tokenizer has no {tokenizer.normalizer} normalizer — export a tokenizer without one"
        )
    return name


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """The `tokenizer.ggml.*` values of a byte-level BPE tokenizer, padded to the model's vocabulary."""
    from lmstack.tokenizer.hf_format import to_hf_json

    pre = _pre_tokenizer(tokenizer)
    data = to_hf_json(tokenizer)
    tokens: list[str | None] = [None] * vocab_size
    types = [TOKEN_UNUSED] * vocab_size
    for text, i in data["model"]["vocab"].items():
        tokens[i], types[i] = text, TOKEN_NORMAL
    for entry in data["added_tokens"]:
        tokens[entry["id"]] = entry["content"]
        types[entry["id"]] = TOKEN_CONTROL if entry["special"] else TOKEN_USER_DEFINED
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    return {
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": [f"{a} {b}" for a, b in data["model"]["merges"]],
        "bos": tokenizer.bos_id,
        "eos": tokenizer.eos_id,
        "chat_template": tokenizer.chat_template or "",
    }


def gguf_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The model's float32 weights under GGUF names, in GGUF's row layout (rope-permuted where needed)."""
    from lmstack.interop.hf import hf_state_dict

    config = model.config
    _, names, permute = ARCHITECTURES[config.family]
    state = hf_state_dict(model)
    if any(name.endswith(".qweight") for name in state):
        raise InputError(
            "the model is already quantized (lmstack int8/int4/nf4 layers) — export its float checkpoint; "
            "--type q8_0/q4_0/q4_k_m quantizes it for llama.cpp"
        )
    out: dict[str, torch.Tensor] = {}
    for hf_name, tensor in state.items():
        gguf_name = _gguf_name(hf_name, names)
        if gguf_name is None:
            raise InputError(
                f"tensor {hf_name} has no GGUF name for {config.family} — this config cannot be exported to GGUF"
            )
        t = tensor.detach().float()
        if config.family == "gpt2" and t.dim() == 2 and ".h." in hf_name:
            t = t.t()  # Conv1D (in, out) -> rows of outputs
        if permute and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            t = permute_rope(t, config.n_heads if ".attn_q." in gguf_name else config.n_kv_heads)
        out[gguf_name] = t.contiguous()
    return out


def _gguf_name(hf_name: str, names: dict[str, str]) -> str | None:
    parts = hf_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():  # the layer index
            pattern = ".".join([*parts[:i], "{i}", *parts[i + 1 :]])
            return names[pattern].format(i=part) if pattern in names else None
    return names.get(hf_name)


def export_gguf(model: Any, tokenizer: Any, path: str | Path, file_type: str = "f16") -> Path:
    """Write `model` and its tokenizer as a llama.cpp GGUF file of `file_type` (atomic)."""
    import gguf

    config = model.config
    _check_exportable(config, file_type)
    arch = ARCHITECTURES[config.family][0]
    tok = tokenizer_metadata(tokenizer, config.vocab_size)
    hf = config_to_hf(config)
    tensors = gguf_tensors(model)
    has_output = "output.weight" in tensors

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(config.name or f"lmstack-{config.family}")
        writer.add_file_type(FILE_TYPES[file_type].ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for hf_key, key in HPARAM_KEYS[arch].items():
            value = hf.get(hf_key)
            if hf_key == "n_inner" and value is None:
                value = config.d_ff
            if value is None:
                continue
            if hf_key in _FLOAT_KEYS:
                writer.add_float32(f"{arch}.{key}", float(value))
            else:
                writer.add_uint32(f"{arch}.{key}", int(value))
        if arch != "gpt2":
            writer.add_uint32(f"{arch}.attention.value_length", config.head_dim)
            writer.add_uint32(f"{arch}.rope.dimension_count", config.head_dim)
        writer.add_uint32(f"{arch}.vocab_size", config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tok["pre"])
        writer.add_token_list(tok["tokens"])
        writer.add_token_types(tok["types"])
        writer.add_token_merges(tok["merges"])
        bos = config.bos_id if config.bos_id is not None else tok["bos"]
        eos = config.eos_id if config.eos_id is not None else tok["eos"]
        if bos is not None:
            writer.add_bos_token_id(bos)
        if eos is not None:
            writer.add_eos_token_id(eos)
        if config.pad_id is not None:
            writer.add_pad_token_id(config.pad_id)
        writer.add_add_bos_token(False)  # our tokenizers add no BOS of their own
        if tok["chat_template"]:
            writer.add_chat_template(tok["chat_template"])
        for name, t in tensors.items():
            qtype = tensor_type(name, tuple(t.shape), file_type, config.n_layers, has_output)
            if qtype == "F32":
                writer.add_tensor(name, t.numpy())
            elif qtype == "F16":
                writer.add_tensor(name, t.to(torch.float16).numpy())
            else:
                data = ggml_quantize(t, qtype).numpy()
                writer.add_tensor(
                    name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType[qtype]
                )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, final)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return final


# ---- import --------------------------------------------------------------------------------------
def _open(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise InputError(f"{path}: no such GGUF file — check the path")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/IndexError on a truncated or foreign file
        raise InputError(
            f"{path}: not a readable GGUF file ({exc}) — the file is truncated or corrupt; re-download or re-export it"
        ) from None


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every key-value of a GGUF header as plain Python values."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def _hf_config(meta: dict[str, Any], arch: str, tensors: dict[str, Any]) -> dict[str, Any]:
    architecture, model_type = _HF_ARCH[arch]
    hf: dict[str, Any] = {"architectures": [architecture], "model_type": model_type}
    for hf_key, key in HPARAM_KEYS[arch].items():
        if f"{arch}.{key}" in meta:
            hf[hf_key] = meta[f"{arch}.{key}"]
    embed = tensors["token_embd.weight"]
    hf["vocab_size"] = int(embed.shape[-1])  # GGUF shapes list the row width first
    hf["tie_word_embeddings"] = "output.weight" not in tensors
    if arch == "gpt2":
        hf["activation_function"] = "gelu_new"
    else:
        hf.setdefault("num_key_value_heads", hf["num_attention_heads"])
        hf.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
        hf.setdefault("rope_theta", 10000.0)
        hf["hidden_act"] = "silu"
        if arch == "llama":
            hf["attention_bias"] = "blk.0.attn_q.bias" in tensors
            hf["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    for ours, key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        hf[ours] = meta.get(f"tokenizer.ggml.{key}")
    return hf


def _tokenizer_from_gguf(meta: dict[str, Any]) -> Any:
    from lmstack.tokenizer import Tokenizer
    from lmstack.tokenizer.hf_format import from_hf_json

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise InputError(
            f"GGUF tokenizer model {meta.get('tokenizer.ggml.model')!r} is not supported — only byte-level BPE ('gpt2') imports"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    patterns = {name: pattern for pattern, name in PRE_TOKENIZERS.items()} | {"default": GPT2_PATTERN}
    if pre not in patterns:
        raise InputError(
            f"GGUF pre-tokenizer {pre!r} is not one lmstack knows — use a file whose tokenizer.ggml.pre is one of {', '.join(patterns)}"
        )
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    vocab, added = {}, []
    for i, text in enumerate(tokens):
        kind = types[i] if i < len(types) else TOKEN_NORMAL
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            added.append({"id": i, "content": text, "special": kind == TOKEN_CONTROL})
        elif kind != TOKEN_UNUSED:
            vocab[text] = i
    data = {
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": patterns[pre]},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "decoder": {"type": "ByteLevel"},
        "model": {
            "type": "BPE",
            "vocab": vocab,
            "merges": [m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges", [])],
        },
    }
    names = {a["id"]: a["content"] for a in added}
    config = {
        "bos_token": names.get(meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token": names.get(meta.get("tokenizer.ggml.eos_token_id")),
        "chat_template": meta.get("tokenizer.chat_template", ""),
    }
    return from_hf_json(Tokenizer, data, config, source="GGUF tokenizer")


def import_gguf(path: str | Path, out: str | Path) -> Path:
    """A llama.cpp GGUF (Llama-family or GPT-2, any type in GGML_BLOCKS) -> an lmstack/HF checkpoint
    folder with float32 (dequantised) weights, the tokenizer and its chat template."""
    from safetensors.torch import save_file

    from lmstack.interop.hf import from_pretrained, save_pretrained

    path = Path(path)
    reader = _open(path)
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in IMPORT_FAMILIES:
        raise InputError(
            f"{path}: GGUF architecture {arch!r} is not supported — import one of {', '.join(IMPORT_FAMILIES)}"
        )
    raw = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in raw:
        raise InputError(f"{path}: no token_embd.weight tensor — the file is not a complete {arch} model")
    for name, t in raw.items():
        if t.tensor_type.name not in GGML_BLOCKS:
            raise InputError(
                f"{path}: tensor {name} is {t.tensor_type.name}, which lmstack cannot decode — use a file of {', '.join(GGML_BLOCKS)}"
            )
    missing = [f"{arch}.{key}" for key in _REQUIRED_KEYS if f"{arch}.{key}" not in meta]
    if missing:
        raise InputError(
            f"{path}: GGUF metadata lacks {', '.join(missing)} — the file is not a complete {arch} model; re-export it"
        )
    hf_config = _hf_config(meta, arch, raw)
    config = config_from_hf(hf_config)
    reverse = {v: k for k, v in ARCHITECTURES[IMPORT_FAMILIES[arch]][1].items()}
    state: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        qtype = t.tensor_type.name
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        data = torch.from_numpy(np.ascontiguousarray(t.data).view(np.uint8).reshape(-1).copy())
        w = ggml_dequantize(data, qtype, shape)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            w = unpermute_rope(w, config.n_heads if ".attn_q." in name else config.n_kv_heads)
        hf_name = _hf_name(name, reverse)
        if hf_name is None:
            raise InputError(
                f"{path}: tensor {name} has no place in a {arch} model — the file is not a standard {arch} GGUF"
            )
        if arch == "gpt2" and w.dim() == 2 and ".h." in hf_name:
            w = w.t()
        state[hf_name] = w.contiguous()
    tokenizer = _tokenizer_from_gguf(meta)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(config_to_hf(config)), encoding="utf-8")
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        model = from_pretrained(folder)
        return save_pretrained(model, out, tokenizer=tokenizer)


def _hf_name(gguf_name: str, reverse: dict[str, str]) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        pattern = ".".join(["blk", "{i}", *parts[2:]])
        return reverse[pattern].format(i=parts[1]) if pattern in reverse else None
    return reverse.get(gguf_name)


def gguf_summary(path: str | Path) -> dict[str, Any]:
    """Architecture, file type and the count of tensors of each ggml type (for reports and tests)."""
    reader = _open(Path(path))
    meta = read_metadata(reader)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return {"architecture": meta.get("general.architecture"), "file_type": meta.get("general.file_type"),
            "types": counts, "tensor_types": {t.name: t.tensor_type.name for t in reader.tensors}}  # fmt: skip


# ---- Ollama ----------------------------------------------------------------------------------------
# Ollama templates are Go templates over .System and .Messages (each .Role, .Content).
OLLAMA_TEMPLATES = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ["<|im_end|>", "<|im_start|>"],
    ),
    "plain": ("{{- range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}assistant:", ["\nuser:"]),
}


def chat_template_kind(template: str) -> str:
    """Which Ollama template a Jinja chat template translates to: ChatML, or plain for none."""
    if not template:
        return "plain"
    if "<|im_start|>" in template and "<|im_end|>" in template:
        return "chatml"
    raise InputError(
        "the tokenizer's chat template is neither ChatML nor empty, and lmstack cannot translate it to an "
        "Ollama TEMPLATE — set a ChatML chat template (or none) on the tokenizer"
    )


def ollama_modelfile(gguf_file: str, tokenizer: Any, temperature: float = 0.1) -> str:
    """A Modelfile: FROM the GGUF, TEMPLATE translated from the chat template, stop tokens, temperature."""
    template, stops = OLLAMA_TEMPLATES[chat_template_kind(tokenizer.chat_template or "")]
    eos = tokenizer.eos_id
    names = {i: s for s, i in tokenizer.special_tokens.items()}
    stops = [*stops, *([names[eos]] if eos in names and names[eos] not in stops else [])]
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines.append(f"PARAMETER temperature {temperature}")
    return "\n".join(lines) + "\n"


def export_ollama(model: Any, tokenizer: Any, out: str | Path, file_type: str = "q4_k_m") -> Path:
    """An Ollama model folder: `model.gguf` plus a `Modelfile` (`ollama create NAME -f Modelfile`)."""
    from lmstack.atomic import atomic_write_text

    folder = Path(out)
    modelfile = ollama_modelfile("model.gguf", tokenizer)  # refuses an untranslatable template first
    folder.mkdir(parents=True, exist_ok=True)
    export_gguf(model, tokenizer, folder / "model.gguf", file_type)
    atomic_write_text(folder / "Modelfile", modelfile)
    return folder
