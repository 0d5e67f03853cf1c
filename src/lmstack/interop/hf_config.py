"""Hugging Face `config.json` <-> `ModelConfig`, for every supported family.

Reading accepts both layouts `transformers` has used for RoPE: version 4 (`rope_theta` at the top level
plus a `rope_scaling` dict keyed by `type` or `rope_type`) and version 5 (one `rope_parameters` dict
holding `rope_theta` too). A key a config.json leaves out takes the value the `transformers` class
would give it, so a sparse config means the same model here as there. When the dict carries an
`lmstack` block (our full config, written by `save_pretrained`), that block wins: it is exact, including
for configs no Hugging Face class can express.

Writing chooses the family's architecture class and `model_type`, and writes both RoPE layouts so
`transformers` 4 and 5 read the same model.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.config import ModelConfig
from lmstack.errors import InputError


@dataclass(frozen=True)
class Family:
    """What a Hugging Face architecture fixes, and the defaults its config class uses."""

    architecture: str
    model_type: str
    defaults: dict[str, Any]
    fixed: dict[str, Any]  # ModelConfig fields every model of the family has


_LLAMA_LIKE = dict(norm="rmsnorm", norm_placement="pre", position="rope", out_bias=False, mlp_bias=False)
_LLAMA_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=None, head_dim=None,
)  # fmt: skip

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        "GPT2LMHeadModel", "gpt2",
        dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
             activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, layer_norm_epsilon=1e-5,
             tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256, pad_token_id=None),
        dict(norm="layernorm", norm_placement="pre", position="learned", qkv_bias=True, out_bias=True, mlp_bias=True),
    ),
    "llama": Family("LlamaForCausalLM", "llama", dict(_LLAMA_DEFAULTS, attention_bias=False, mlp_bias=False), {}),
    "mistral": Family(
        "MistralForCausalLM", "mistral",
        dict(_LLAMA_DEFAULTS, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=131072,
             sliding_window=4096),
        dict(_LLAMA_LIKE, qkv_bias=False),
    ),
    "mixtral": Family(
        "MixtralForCausalLM", "mixtral",
        dict(_LLAMA_DEFAULTS, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=131072,
             rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, num_local_experts=8, num_experts_per_tok=2,
             router_aux_loss_coef=0.001),
        dict(_LLAMA_LIKE, qkv_bias=False, router_renormalize=True),
    ),
    "qwen2": Family(
        "Qwen2ForCausalLM", "qwen2",
        dict(_LLAMA_DEFAULTS, vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768,
             use_sliding_window=False, sliding_window=4096, max_window_layers=28, layer_types=None,
             bos_token_id=None, eos_token_id=None),
        dict(_LLAMA_LIKE, qkv_bias=True),
    ),
    "phi3": Family(
        "Phi3ForCausalLM", "phi3",
        dict(_LLAMA_DEFAULTS, vocab_size=32064, hidden_size=3072, intermediate_size=8192, max_position_embeddings=4096,
             original_max_position_embeddings=4096, rms_norm_eps=1e-5, resid_pdrop=0.0, sliding_window=None,
             eos_token_id=32000, pad_token_id=32000),
        dict(_LLAMA_LIKE, qkv_bias=False),
    ),
    "gemma": Family(
        "GemmaForCausalLM", "gemma",
        dict(_LLAMA_DEFAULTS, vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
             num_attention_heads=16, head_dim=256, hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
             tie_word_embeddings=True, attention_bias=False, bos_token_id=2, eos_token_id=1, pad_token_id=0),
        dict(norm="rmsnorm", norm_placement="pre", position="rope", norm_unit_offset=True, mlp_bias=False),
    ),
}  # fmt: skip

ARCHITECTURES = {f.architecture: name for name, f in FAMILIES.items()}
MODEL_TYPES = {f.model_type: name for name, f in FAMILIES.items()}

# hidden_act of a gated (Llama-like) MLP -> our mlp; Gemma's legacy "gelu" means the tanh approximation.
_GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}
_GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


# ---- reading ----------------------------------------------------------------------------------
def read_config_json(path_or_dict: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The config dict and a label naming where it came from (for error messages)."""
    if isinstance(path_or_dict, dict):
        return path_or_dict, "config dict"
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: no such config file — pass a Hugging Face model folder or its config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"{path}: not a readable JSON config ({exc}) — re-download or re-save the checkpoint"
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object — re-download or re-save the checkpoint")
    return data, str(path)


def detect_family(data: dict[str, Any], source: str = "config") -> str:
    """The family named by `architectures` (or, without it, `model_type`)."""
    supported = ", ".join(f"{f.architecture} ({f.model_type})" for f in FAMILIES.values())
    architectures = data.get("architectures") or []
    for arch in architectures:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if not architectures and data.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[data["model_type"]]
    found = architectures or data.get("model_type")
    raise InputError(f"{source}: unsupported architecture {found!r} — supported: {supported}")


def config_from_hf(path_or_dict: str | Path | dict[str, Any]) -> ModelConfig:
    """`ModelConfig` for a Hugging Face config (a dict, a config.json path, or its folder)."""
    data, source = read_config_json(path_or_dict)
    try:
        if isinstance(data.get("lmstack"), dict):
            return ModelConfig.from_dict(data["lmstack"])
        family = detect_family(data, source)
        fields = _read_gpt2(data) if family == "gpt2" else _read_decoder(data, family)
        return ModelConfig(**fields)
    except InputError as exc:
        if str(exc).startswith(source):
            raise
        raise InputError(f"{source}: {exc}") from None
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as exc:  # a field of the wrong type
        raise InputError(
            f"{source}: malformed config field ({exc}) — fix or re-download config.json"
        ) from None


def _getter(data: dict[str, Any], family: str) -> Callable[[str], Any]:
    defaults = FAMILIES[family].defaults

    def get(key: str) -> Any:
        return data[key] if key in data else defaults.get(key)

    return get


def _token_ids(get: Callable[[str], Any], vocab_size: int) -> dict[str, Any]:
    ids: dict[str, Any] = {}
    for ours, theirs in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
        values = get(theirs)
        # Llama 3 instruct lists several EOS ids (<|end_of_text|>, <|eot_id|>): the first is the primary
        # one, the rest become extra_eos_ids, and generation stops at any of them
        values = values if isinstance(values, list) else [values]
        kept = []
        for value in values:
            if value is not None and not 0 <= int(value) < vocab_size:
                warnings.warn(
                    f"{theirs}={value} lies outside the vocabulary of {vocab_size}; ignoring it", stacklevel=3
                )
            elif value is not None and int(value) not in kept:
                kept.append(int(value))
        ids[ours] = kept[0] if kept else None
        if ours == "eos_id":
            ids["extra_eos_ids"] = tuple(kept[1:])
    return ids


def eos_token_id_field(config: ModelConfig) -> int | list[int] | None:
    """`eos_token_id` as Hugging Face writes it: one id, or a list when the model has several."""
    return list(config.eos_ids) if config.extra_eos_ids else config.eos_id


def _read_decoder(data: dict[str, Any], family: str) -> dict[str, Any]:
    get = _getter(data, family)
    fam = FAMILIES[family]
    d_model, n_heads = get("hidden_size"), get("num_attention_heads")
    n_kv_heads = get("num_key_value_heads") or n_heads
    act = get("hidden_act")
    if (
        family == "gemma" and act == "gelu"
    ):  # legacy Gemma value meaning the tanh approximation, as in transformers
        act = "gelu_pytorch_tanh"
    if act not in _GATED_ACTS:
        raise InputError(
            f"hidden_act {act!r} is not supported for {family} — use one of {', '.join(_GATED_ACTS)}"
        )
    vocab_size = get("vocab_size")
    fields: dict[str, Any] = dict(
        family=family, vocab_size=vocab_size, d_model=d_model, n_layers=get("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=n_kv_heads, head_dim=get("head_dim") or d_model // n_heads, d_ff=get("intermediate_size"),
        max_seq_len=get("max_position_embeddings"), norm_eps=float(get("rms_norm_eps")), mlp=_GATED_ACTS[act],
        tie_embeddings=bool(get("tie_word_embeddings")), **_token_ids(get, vocab_size),
    )  # fmt: skip
    fields.update(_read_rope(data, family, get))
    fields.update(fam.fixed)
    if family in ("llama", "gemma"):
        fields["qkv_bias"] = fields["out_bias"] = bool(get("attention_bias"))
    if family == "llama":
        fields["mlp_bias"] = bool(get("mlp_bias"))
    if family == "gemma":
        fields["embedding_scale"] = d_model**0.5  # GemmaModel scales embeddings by sqrt(hidden_size)
    if family in ("mistral", "mixtral", "phi3"):
        fields["sliding_window"] = get("sliding_window")
    if family == "qwen2":
        fields["sliding_window"] = _qwen2_window(get, fields["n_layers"])
    if family == "phi3":
        fields["dropout"] = float(get("resid_pdrop") or 0.0)
    if family == "mixtral":
        fields.update(
            n_experts=get("num_local_experts"),
            n_experts_per_token=get("num_experts_per_tok"),
            router_aux_loss_coef=float(get("router_aux_loss_coef")),
        )
    return fields


def _qwen2_window(get: Callable[[str], Any], n_layers: int) -> int | None:
    # transformers: layer i slides when use_sliding_window and i >= max_window_layers (or per `layer_types`)
    window = get("sliding_window") if get("use_sliding_window") else None
    layer_types = get("layer_types") or [
        "sliding_attention" if window is not None and i >= get("max_window_layers") else "full_attention"
        for i in range(n_layers)
    ]
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"} and get("sliding_window"):
        return get("sliding_window")
    raise InputError(
        f"layer_types {sorted(kinds)} mixes full and sliding-window layers — lmstack uses one window for every "
        "layer; set use_sliding_window=false or max_window_layers=0"
    )


def _read_rope(data: dict[str, Any], family: str, get: Callable[[str], Any]) -> dict[str, Any]:
    """RoPE fields from either layout: v5 `rope_parameters`, or v4 `rope_theta` + `rope_scaling`."""
    # transformers 5 gives a v4 `rope_scaling` priority over `rope_parameters` when both are present
    params = data.get("rope_scaling") or data.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise InputError(f"rope parameters must be a JSON object, got {params!r} — fix config.json")
    if any(isinstance(v, dict) for v in params.values()):
        raise InputError(
            "per-layer RoPE parameters are not supported — lmstack uses one RoPE for every layer"
        )
    theta = params.get("rope_theta", get("rope_theta"))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", data.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise InputError(f"partial_rotary_factor={partial} is not supported — lmstack rotates the whole head")
    if kind not in ROPE_TYPES:
        raise InputError(f"RoPE type {kind!r} is not supported — supported: {', '.join(ROPE_TYPES)}")
    max_pos = get("max_position_embeddings")
    out: dict[str, Any] = dict(rope_theta=float(theta))
    if kind == "default":
        return out
    # Phi-3 keeps the pretraining length at the top level and transformers gives it priority there.
    if family == "phi3" and kind in ("llama3", "yarn"):
        original = get("original_max_position_embeddings")
    else:
        original = params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if kind == "linear":
        out.update(rope_scaling="linear", rope_factor=float(factor))
    elif kind == "dynamic":
        # transformers' dynamic NTK measures growth against max_position_embeddings (the pretraining length)
        out.update(
            rope_scaling="dynamic", rope_factor=float(factor), rope_original_max_seq_len=max_pos,
            max_seq_len=int(max_pos * float(factor)),
        )  # fmt: skip
    elif kind == "llama3":
        out.update(
            rope_scaling="llama3", rope_factor=float(factor), rope_original_max_seq_len=original,
            rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        )  # fmt: skip
    else:  # yarn
        if params.get("truncate", True) is False:
            raise InputError(
                "YaRN with truncate=false is not supported — lmstack rounds the correction range"
            )
        factor = float(factor) if factor is not None else max_pos / original
        attention_factor = params.get("attention_factor")
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if attention_factor is None and mscale and mscale_all_dim:  # DeepSeek's form, as in transformers
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        out.update(
            rope_scaling="yarn", rope_factor=factor, rope_original_max_seq_len=original,
            rope_beta_fast=float(params.get("beta_fast") or 32.0), rope_beta_slow=float(params.get("beta_slow") or 1.0),
            rope_attention_factor=None if attention_factor is None else float(attention_factor),
        )  # fmt: skip
    return out


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _read_gpt2(data: dict[str, Any]) -> dict[str, Any]:
    get = _getter(data, "gpt2")
    act = get("activation_function")
    if act not in _GPT2_ACTS:
        raise InputError(f"activation_function {act!r} is not supported — use one of {', '.join(_GPT2_ACTS)}")
    if get("scale_attn_by_inverse_layer_idx"):
        raise InputError(
            "scale_attn_by_inverse_layer_idx=true is not supported — lmstack scales by 1/sqrt(head_dim)"
        )
    if get("add_cross_attention"):
        raise InputError("add_cross_attention=true is not supported — lmstack builds decoder-only models")
    d_model, vocab_size = get("n_embd"), get("vocab_size")
    return dict(
        family="gpt2", vocab_size=vocab_size, d_model=d_model, n_layers=get("n_layer"), n_heads=get("n_head"),
        d_ff=get("n_inner") or 4 * d_model, max_seq_len=get("n_positions"), norm_eps=float(get("layer_norm_epsilon")),
        mlp=_GPT2_ACTS[act], tie_embeddings=bool(get("tie_word_embeddings")),
        dropout=float(max(get("resid_pdrop") or 0.0, get("embd_pdrop") or 0.0)),
        **_token_ids(get, vocab_size), **FAMILIES["gpt2"].fixed,
    )  # fmt: skip


# ---- writing ----------------------------------------------------------------------------------
# What each family's Hugging Face class can express: (field, predicate, what it requires).
_Check = tuple[str, Callable[[ModelConfig], bool], str]
_COMMON: list[_Check] = [
    ("norm_placement", lambda c: c.norm_placement == "pre", "pre-norm"),
]
_ROPE_DECODER: list[_Check] = [
    ("norm", lambda c: c.norm == "rmsnorm", "RMSNorm"),
    ("position", lambda c: c.position == "rope", "RoPE positions"),
    ("embedding_scale", lambda c: c.embedding_scale == 1.0, "no embedding scale"),
    ("norm_unit_offset", lambda c: not c.norm_unit_offset, "a plain RMSNorm gain"),
    ("mlp_bias", lambda c: not c.mlp_bias, "no MLP biases"),
]
_DENSE: list[_Check] = [("n_experts", lambda c: c.n_experts == 0, "a dense MLP")]
_NO_WINDOW: list[_Check] = [("sliding_window", lambda c: c.sliding_window is None, "full attention")]
_NO_ATTN_BIAS: list[_Check] = [
    ("qkv_bias", lambda c: not c.qkv_bias and not c.out_bias, "no attention biases")
]
_SWIGLU: list[_Check] = [("mlp", lambda c: c.mlp == "swiglu", "a SwiGLU MLP")]
_EXPRESSIBLE: dict[str, list[_Check]] = {
    "gpt2": _COMMON + _DENSE + _NO_WINDOW + [
        ("norm", lambda c: c.norm == "layernorm", "LayerNorm"),
        ("position", lambda c: c.position == "learned", "learned positions"),
        ("mlp", lambda c: c.mlp in _GPT2_MLPS, "a GELU or ReLU MLP"),
        ("qkv_bias", lambda c: c.qkv_bias and c.out_bias and c.mlp_bias, "biases everywhere"),
        ("n_kv_heads", lambda c: c.n_kv_heads == c.n_heads, "multi-head attention"),
        ("head_dim", lambda c: c.head_dim * c.n_heads == c.d_model, "head_dim = d_model / n_heads"),
        ("embedding_scale", lambda c: c.embedding_scale == 1.0, "no embedding scale"),
    ],
    "llama": _COMMON + _DENSE + _NO_WINDOW + [
        c for c in _ROPE_DECODER if c[0] != "mlp_bias"
    ] + [("qkv_bias", lambda c: c.qkv_bias == c.out_bias, "qkv_bias == out_bias"),
         ("mlp", lambda c: c.mlp in ("swiglu", "geglu"), "a gated MLP")],
    "mistral": _COMMON + _DENSE + _ROPE_DECODER + _NO_ATTN_BIAS + _SWIGLU,
    "mixtral": _COMMON + _ROPE_DECODER + _NO_ATTN_BIAS + _SWIGLU + [
        ("n_experts", lambda c: c.n_experts > 0, "experts"),
        ("router_renormalize", lambda c: c.router_renormalize, "renormalised router weights"),
    ],
    "qwen2": _COMMON + _DENSE + _ROPE_DECODER + _SWIGLU + [
        ("qkv_bias", lambda c: c.qkv_bias and not c.out_bias, "qkv biases and no output bias"),
    ],
    "phi3": _COMMON + _DENSE + _ROPE_DECODER + _NO_ATTN_BIAS + _SWIGLU,
    "gemma": _COMMON + _DENSE + _NO_WINDOW + [
        ("norm", lambda c: c.norm == "rmsnorm" and c.norm_unit_offset, "RMSNorm with a 1 + weight gain"),
        ("position", lambda c: c.position == "rope", "RoPE positions"),
        ("mlp", lambda c: c.mlp == "geglu" and not c.mlp_bias, "a GeGLU MLP without biases"),
        ("qkv_bias", lambda c: c.qkv_bias == c.out_bias, "qkv_bias == out_bias"),
        ("embedding_scale", lambda c: math.isclose(c.embedding_scale, c.d_model**0.5), "embedding_scale = sqrt(d_model)"),
    ],
}  # fmt: skip
_GPT2_MLPS = ("gelu", "gelu_tanh", "relu")


def hf_incompatibilities(config: ModelConfig) -> list[str]:
    """Why `transformers`' class for `config.family` would not compute the same function (empty: it would).

    Such configs still save and load here, through the `lmstack` block; `transformers` loads the weights
    but its logits differ.
    """
    family = FAMILIES[config.family]
    return [
        f"{field_name}: {family.architecture} needs {needs}"
        for field_name, ok, needs in _EXPRESSIBLE[config.family]
        if not ok(config)
    ]


def _rope_v4(config: ModelConfig) -> dict[str, Any] | None:
    """The `rope_scaling` dict of the transformers 4 layout (None for plain RoPE)."""
    c = config
    if c.position != "rope" or c.rope_scaling == "none":
        return None
    scaling: dict[str, Any] = {"rope_type": c.rope_scaling, "type": c.rope_scaling, "factor": c.rope_factor}
    if c.rope_scaling in ("llama3", "yarn"):
        scaling["original_max_position_embeddings"] = c.rope_original_max_seq_len
    if c.rope_scaling == "llama3":
        scaling.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor)
    if c.rope_scaling == "yarn":
        scaling.update(beta_fast=c.rope_beta_fast, beta_slow=c.rope_beta_slow)
        if c.rope_attention_factor is not None:
            scaling["attention_factor"] = c.rope_attention_factor
    return scaling


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A `config.json` dict for the family's `transformers` class, with our full config as `lmstack`."""
    c, family = config, FAMILIES[config.family]
    out: dict[str, Any] = {"architectures": [family.architecture], "model_type": family.model_type}
    ids = dict(bos_token_id=c.bos_id, eos_token_id=eos_token_id_field(c), pad_token_id=c.pad_id)
    if c.family == "gpt2":
        out.update(
            vocab_size=c.vocab_size, n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.d_ff,
            n_positions=c.max_seq_len, activation_function={"gelu": "gelu", "gelu_tanh": "gelu_new"}.get(c.mlp, c.mlp),
            layer_norm_epsilon=c.norm_eps, resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=0.0,
            scale_attn_weights=True, tie_word_embeddings=c.tie_embeddings, **ids,
        )  # fmt: skip
    else:
        max_pos = c.max_seq_len
        if c.rope_scaling == "dynamic":  # transformers grows the base past max_position_embeddings
            max_pos = c.rope_original_max_seq_len
        rope_scaling = _rope_v4(c)
        out.update(
            vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
            hidden_act="gelu_pytorch_tanh" if c.mlp == "geglu" else "silu", max_position_embeddings=max_pos,
            rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings, attention_dropout=0.0,
            rope_theta=c.rope_theta, rope_scaling=rope_scaling,
            rope_parameters={"rope_type": "default", **(rope_scaling or {}), "rope_theta": c.rope_theta},
            **ids,
        )  # fmt: skip
        out["rope_parameters"].pop("type", None)
        if c.family in ("llama", "gemma"):
            out["attention_bias"] = c.qkv_bias
        if c.family == "llama":
            out["mlp_bias"] = c.mlp_bias
        if c.family in ("mistral", "mixtral", "phi3"):
            out["sliding_window"] = c.sliding_window
        if c.family == "qwen2":
            window = c.sliding_window is not None
            out.update(
                use_sliding_window=window, sliding_window=c.sliding_window, max_window_layers=0 if window else c.n_layers,
                layer_types=["sliding_attention" if window else "full_attention"] * c.n_layers,
            )  # fmt: skip
        if c.family == "phi3":
            out.update(
                resid_pdrop=c.dropout, embd_pdrop=0.0,
                original_max_position_embeddings=c.rope_original_max_seq_len or c.max_seq_len,
            )  # fmt: skip
        if c.family == "mixtral":
            out.update(
                num_local_experts=c.n_experts, num_experts_per_tok=c.n_experts_per_token,
                router_aux_loss_coef=c.router_aux_loss_coef, output_router_logits=False, router_jitter_noise=0.0,
            )  # fmt: skip
    out["lmstack"] = c.to_dict()
    return out
