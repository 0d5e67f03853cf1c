"""`ModelConfig`: one frozen dataclass describes every decoder lmstack builds.

Variation is by field, not by subclass: a block reads `norm`, `mlp`, `position`, ... and picks a small
function by name. Variants are made with `dataclasses.replace`, which re-runs validation. The exact
published hyperparameters of well-known models live in `presets.py` as data.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from typing import Any

from lmstack.errors import InputError

NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
MLPS = ("gelu", "gelu_tanh", "relu", "swiglu", "geglu")
GATED_MLPS = ("swiglu", "geglu")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
ROPE_SCALINGS = ("none", "linear", "dynamic", "yarn", "llama3")
FAMILIES = ("gpt2", "llama", "mistral", "mixtral", "qwen2", "phi3", "gemma")


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a decoder-only transformer.

    Defaults describe a Llama-style model (pre-RMSNorm, SwiGLU, RoPE, no biases). `n_kv_heads` and
    `head_dim` default to `n_heads` and `d_model // n_heads` and are stored resolved, so a saved config
    is explicit — which means `dataclasses.replace(c, d_model=..., n_heads=...)` keeps the old head_dim
    and KV heads: pass `head_dim=None, n_kv_heads=None` to re-derive them. `family` names the Hugging Face architecture used when saving a checkpoint.
    """

    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # n_heads: MHA; 1 < n < n_heads: GQA; 1: MQA
    head_dim: int | None = None
    d_ff: int = 11008
    max_seq_len: int = 2048
    # normalisation
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # Gemma: the norm multiplies by (1 + weight), weight initialised at 0
    norm_placement: str = "pre"  # pre: x + f(norm(x)); post: norm(x + f(x)) (original transformer)
    # feed-forward
    mlp: str = "swiglu"
    # positions
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_original_max_seq_len: int | None = None  # context the model was pretrained at (scaled RoPE)
    rope_low_freq_factor: float = 1.0  # llama3 scaling
    rope_high_freq_factor: float = 4.0  # llama3 scaling
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_attention_factor: float | None = None  # yarn: None means 0.1 ln(factor) + 1
    # biases
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    # embeddings
    tie_embeddings: bool = False
    embedding_scale: float = 1.0  # Gemma multiplies token embeddings by sqrt(d_model)
    # attention
    sliding_window: int | None = None  # a query at position i sees keys j with i - window < j <= i
    # mixture of experts (n_experts = 0: dense MLP)
    n_experts: int = 0
    n_experts_per_token: int = 2
    router_renormalize: bool = True  # renormalise the top-k router weights to sum to 1 (Mixtral)
    router_aux_loss_coef: float = 0.0
    # regularisation
    dropout: float = 0.0
    # token ids
    bos_id: int | None = None
    eos_id: int | None = None  # the primary end-of-sequence id (what training appends)
    extra_eos_ids: tuple[int, ...] = ()  # further ids that also end a reply (Llama 3: <|eot_id|>)
    pad_id: int | None = None
    # provenance
    family: str = "llama"
    hf_repo: str | None = None
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.extra_eos_ids, (list, tuple)):  # JSON gives a list
            object.__setattr__(self, "extra_eos_ids", tuple(self.extra_eos_ids))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.n_heads > 0 and self.d_model % self.n_heads:
                _bad(
                    "d_model",
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}",
                    "pick n_heads dividing d_model, or set head_dim explicitly",
                )
            if self.n_heads > 0:
                object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        self._validate()

    def _validate(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "d_ff",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _bad(
                    name,
                    f"{name} must be a positive integer, got {value!r}",
                    f"set {name} to an integer >= 1",
                )
        if self.n_heads % self.n_kv_heads:
            _bad(
                "n_kv_heads",
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}",
                "use a divisor of n_heads (n_heads for MHA, 1 for MQA)",
            )
        if self.head_dim % 2 and self.position == "rope":
            _bad(
                "head_dim",
                f"RoPE rotates pairs of dimensions; head_dim={self.head_dim} is odd",
                "use an even head_dim",
            )
        for name, allowed in (
            ("norm", NORMS),
            ("norm_placement", NORM_PLACEMENTS),
            ("mlp", MLPS),
            ("position", POSITIONS),
            ("rope_scaling", ROPE_SCALINGS),
            ("family", FAMILIES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                _bad(name, f"unknown {name} {value!r}", f"use one of {', '.join(allowed)}")
        if self.norm_eps <= 0:
            _bad("norm_eps", f"norm_eps must be > 0, got {self.norm_eps}", "use e.g. 1e-5")
        if self.rope_theta <= 0:
            _bad("rope_theta", f"rope_theta must be > 0, got {self.rope_theta}", "use e.g. 10000")
        if self.rope_scaling != "none":
            if self.position != "rope":
                _bad(
                    "rope_scaling",
                    f"rope_scaling={self.rope_scaling!r} needs position='rope'",
                    "set rope_scaling='none'",
                )
            if self.rope_factor < 1:
                _bad(
                    "rope_factor",
                    f"rope_factor must be >= 1, got {self.rope_factor}",
                    "use the context extension ratio",
                )
            if self.rope_scaling in ("dynamic", "yarn", "llama3") and not self.rope_original_max_seq_len:
                _bad(
                    "rope_original_max_seq_len",
                    f"rope_scaling={self.rope_scaling!r} needs the pretraining context length",
                    "set rope_original_max_seq_len",
                )
        if self.sliding_window is not None and self.sliding_window <= 0:
            _bad(
                "sliding_window",
                f"sliding_window must be positive or None, got {self.sliding_window}",
                "use None for full attention",
            )
        if self.n_experts < 0:
            _bad("n_experts", f"n_experts must be >= 0, got {self.n_experts}", "use 0 for a dense MLP")
        if self.n_experts and not 1 <= self.n_experts_per_token <= self.n_experts:
            _bad(
                "n_experts_per_token",
                f"top-k={self.n_experts_per_token} must lie in 1..n_experts={self.n_experts}",
                "choose k between 1 and n_experts",
            )
        if not 0.0 <= self.dropout < 1.0:
            _bad("dropout", f"dropout must lie in [0, 1), got {self.dropout}", "use e.g. 0.0 or 0.1")
        if self.embedding_scale <= 0:
            _bad("embedding_scale", f"embedding_scale must be > 0, got {self.embedding_scale}", "use 1.0")
        for name in ("bos_id", "eos_id", "pad_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                _bad(
                    name,
                    f"{name}={value} is outside the vocabulary [0, {self.vocab_size})",
                    f"set {name} to a valid id or None",
                )
        extra = self.extra_eos_ids
        if not isinstance(extra, tuple) or any(
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in extra
        ):
            _bad(
                "extra_eos_ids",
                f"must be token ids in [0, {self.vocab_size}), got {extra!r}",
                "list valid ids, or () for none",
            )
        if extra and self.eos_id is None:
            _bad(
                "extra_eos_ids", "are set but eos_id is None", "set eos_id to the primary end-of-sequence id"
            )
        if self.eos_id in extra or len(set(extra)) != len(extra):
            _bad("extra_eos_ids", f"repeat an id ({extra!r}, eos_id={self.eos_id})", "list each id once")

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a sequence, the primary `eos_id` first; generation stops at any of them."""
        return () if self.eos_id is None else (self.eos_id, *self.extra_eos_ids)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def gated_mlp(self) -> bool:
        return self.mlp in GATED_MLPS

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """The exact published hyperparameters of a named model (see `presets.PRESETS`)."""
        from lmstack.presets import PRESETS

        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=4, cutoff=0.4)
            hint = f"did you mean {', '.join(close)}?" if close else f"known presets: {', '.join(PRESETS)}"
            raise InputError(f"unknown preset {name!r} — {hint}")
        return cls(name=name, **PRESETS[name])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict (e.g. the `lmstack` block of a checkpoint); unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            hints = ", ".join(f"{k}" + (f" (did you mean {c[0]}?)" if c else "") for k, c in close.items())
            raise InputError(f"unknown ModelConfig field(s): {hints} — the field list is in the README")
        try:
            return cls(**data)
        except TypeError as exc:
            raise InputError(f"bad ModelConfig: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _bad(field_name: str, problem: str, fix: str) -> None:
    raise InputError(f"ModelConfig.{field_name}: {problem} — {fix}")
