"""Trainable token rows: only chosen rows of the embedding (and of the LM head) train, as PEFT's
`trainable_token_indices` does.

Why: a base without a chat template gets the ChatML special tokens as new vocabulary rows, all started
at the mean row (vocab.py). Under LoRA the embedding and head are frozen, so `<|im_start|>` and
`<|im_end|>` would stay one and the same vector: the model could not tell a turn's start from its end,
nor learn to stop. Training the whole embedding (`modules_to_save`) would cost vocab × d trainable
parameters and optimizer state; training only the new rows costs k × d.

A wrapped layer keeps its own frozen `weight` (so the model's names and a tied head's sharing stay as
they were) and adds `token_rows`, the k replacement rows for the ids in `token_indices` — replacement
values, not deltas, like PEFT's `trainable_tokens_delta`, so a resized base whose new rows were
re-initialised differently still gets exactly the trained rows. The embedding looks ids up and swaps
in the trained rows; the head computes all logits and swaps in the k columns the trained rows give.
A tied head shares its embedding's `token_rows` parameter (one set of rows trains both, as PEFT ties
its head adapter to the embedding's).

PEFT's folder holds them as `base_model.model.<hf embedding path>.token_adapter.trainable_tokens_delta`
(and the same under the head's path when it is not tied), with
`"trainable_token_indices": {"<hf embedding path>": [ids], "<hf head path>": [ids]}` in its config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import InputError
from lmstack.finetune.lora import PEFT_PREFIX, LoraLinear, NameMap, _adapter_dtype, _mapper

EMBEDDING, HEAD = "tok_emb", "lm_head"  # the Transformer's module names
PEFT_TOKEN_SUFFIX = ".token_adapter.trainable_tokens_delta"
PEFT_TOKEN_CONFIG = "trainable_token_indices"


def _new_rows(weight: torch.Tensor, indices: torch.Tensor) -> nn.Parameter:
    # kept in fp32 on a 16-bit base for the same reason as LoRA's A and B: small steps would round away
    return nn.Parameter(weight.detach()[indices].to(_adapter_dtype(weight.dtype)).clone())


class TokenEmbedding(nn.Embedding):
    """`base` with the rows of `token_indices` replaced by the trainable `token_rows`."""

    def __init__(self, base: nn.Embedding, indices: Sequence[int]) -> None:
        nn.Module.__init__(self)  # adopt base's parameter rather than allocate a new one
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = base.padding_idx, base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse
        self.weight = base.weight
        index = torch.tensor(list(indices), dtype=torch.long, device=base.weight.device)
        self.register_buffer("token_indices", index, persistent=False)
        # slot[id] = the id's row in token_rows, or -1: one gather tells which ids are replaced
        slot = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=index.device)
        slot[index] = torch.arange(len(index), device=index.device)
        self.register_buffer("token_slot", slot, persistent=False)
        self.token_rows = _new_rows(base.weight, index)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type)
        slot = self.token_slot[ids]  # (B, T): row in token_rows, or -1
        trained = self.token_rows[slot.clamp(min=0)].to(out.dtype)  # (B, T, d)
        return torch.where((slot >= 0)[..., None], trained, out)


class TokenHead(nn.Linear):
    """`base` (the LM head) with the logits of `token_indices` computed from the trainable `token_rows`
    (its own, or a tied embedding's `TokenEmbedding.token_rows`)."""

    def __init__(self, base: nn.Linear, indices: Sequence[int], rows: nn.Parameter | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        index = torch.tensor(list(indices), dtype=torch.long, device=base.weight.device)
        self.register_buffer("token_indices", index, persistent=False)
        self.token_rows = rows if rows is not None else _new_rows(base.weight, index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight, self.bias)  # (..., vocab)
        bias = None if self.bias is None else self.bias[self.token_indices]
        trained = F.linear(x, self.token_rows.to(x.dtype), bias)  # (..., k)
        return logits.index_copy(-1, self.token_indices, trained.to(logits.dtype))


def _check_indices(model: nn.Module, indices: Sequence[int]) -> list[int]:
    vocab = model.tok_emb.num_embeddings
    out = list(dict.fromkeys(int(i) for i in indices))  # PEFT's order: row k of the tensor is id k
    if not out or min(out) < 0 or max(out) >= vocab:
        raise InputError(
            f"trainable token ids {list(indices)[:8]} must be a non-empty list of ids in [0, {vocab}) — "
            "give the ids of the tokens whose rows should train"
        )
    return out


def apply_token_rows(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Make the embedding rows (and head rows) of `indices` trainable, in place; the rest of the model
    keeps its `requires_grad` (call after `apply_lora`, which freezes it)."""
    if token_rows(model):
        raise InputError("the model already has trainable token rows — apply them once")
    if isinstance(model.lm_head, LoraLinear):
        raise InputError("the LM head has a LoRA adapter — train its token rows or adapt it, not both")
    index = _check_indices(model, indices)
    tied = model.lm_head.weight is model.tok_emb.weight
    model.tok_emb = TokenEmbedding(model.tok_emb, index)
    model.lm_head = TokenHead(model.lm_head, index, model.tok_emb.token_rows if tied else None)
    return model


def token_rows(model: nn.Module) -> dict[str, TokenEmbedding | TokenHead]:
    """The wrapped layers by module name (empty when the model has none)."""
    return {n: getattr(model, n) for n in (EMBEDDING, HEAD) if isinstance(getattr(model, n, None), (TokenEmbedding, TokenHead))}  # fmt: skip


def unload_token_rows(model: nn.Module) -> nn.Module:
    """Write the trained rows into the weights and put the plain layers back (in place)."""
    layers = token_rows(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.index_copy_(0, layer.token_indices, layer.token_rows.to(layer.weight.dtype))
    if EMBEDDING in layers:
        layer = layers[EMBEDDING]
        plain = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx, device="meta")
        plain.weight = layer.weight
        model.tok_emb = plain
    if HEAD in layers:
        layer = layers[HEAD]
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        model.lm_head = plain
    return model


def _shared(layers: Mapping[str, Any]) -> bool:
    return len(layers) == 2 and layers[HEAD].token_rows is layers[EMBEDDING].token_rows


def peft_token_rows(
    model: nn.Module, name_map: NameMap = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors under PEFT's names, the config entries) for the model's token rows; empty when none.
    A tied head's rows are its embedding's and are stored once, under the embedding (as PEFT)."""
    layers = token_rows(model)
    if not layers:
        return {}, {}
    to_hf = _mapper(name_map)
    tensors, indices = {}, {}
    for name, layer in layers.items():
        if name == HEAD and _shared(layers):
            continue
        tensors[f"{PEFT_PREFIX}{to_hf(name)}{PEFT_TOKEN_SUFFIX}"] = layer.token_rows.detach().contiguous()
        indices[to_hf(name)] = layer.token_indices.tolist()
    return tensors, {PEFT_TOKEN_CONFIG: indices}


def is_token_key(key: str) -> bool:
    return key.endswith(PEFT_TOKEN_SUFFIX)


def load_token_rows(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], name_map: NameMap = None
) -> nn.Module:
    """Apply (or overwrite) token rows from a PEFT folder's tensors and config, in place. The config's
    `trainable_token_indices` is a list (the input embedding's ids) or {module name or suffix: ids}."""
    spec = config.get(PEFT_TOKEN_CONFIG)
    if spec is None:
        return model
    to_hf = _mapper(name_map)
    names = {EMBEDDING: to_hf(EMBEDDING), HEAD: to_hf(HEAD)}
    if not isinstance(spec, Mapping):
        spec = {names[EMBEDDING]: spec}
    wanted: dict[str, list[int]] = {}
    for key, ids in spec.items():
        ours = [n for n, hf in names.items() if hf == key or hf.endswith(f".{key}")]
        if not ours:
            raise InputError(
                f"trainable_token_indices names {key!r}, which is neither the embedding ({names[EMBEDDING]}) nor "
                "the LM head of this model — load the adapter into the model it was trained for"
            )
        wanted[ours[0]] = list(ids)
    if EMBEDDING not in wanted:
        raise InputError(
            "trainable_token_indices without the embedding's ids is not supported — train both rows"
        )
    if HEAD in wanted and wanted[HEAD] != wanted[EMBEDDING]:
        raise InputError("the embedding and LM head train different token ids — use the same ids for both")
    if not token_rows(model):
        apply_token_rows(model, wanted[EMBEDDING])
    layers = token_rows(model)
    for name, layer in layers.items():
        if name == HEAD and _shared(layers):
            continue
        key = f"{PEFT_PREFIX}{names[name]}{PEFT_TOKEN_SUFFIX}"
        if key not in tensors:
            if name == HEAD and HEAD not in wanted:
                continue  # PEFT trains an untied head's rows only when asked; ours stay the base's
            raise InputError(f"the adapter has no tensor {key!r} for the trainable token rows it lists")
        if layer.token_indices.tolist() != wanted.get(name, wanted[EMBEDDING]):
            raise InputError(
                f"the adapter trains token ids {wanted[EMBEDDING][:8]} but the model's rows are "
                f"{layer.token_indices.tolist()[:8]} — load it into a fresh base model"
            )
        tensor = tensors[key]
        if tensor.shape != layer.token_rows.shape:
            raise InputError(
                f"adapter tensor {key} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(layer.token_rows.shape)} — the adapter was trained for a different model"
            )
        with torch.no_grad():
            layer.token_rows.copy_(tensor)
    return model
