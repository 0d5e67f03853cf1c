"""Growing a model's vocabulary for new special tokens (a chat template's), and the chat-ready base.

New rows of the embedding (and of an untied LM head) start at the mean of the existing rows: a new
token then looks like an average token rather than a random one, so the first steps' logits and
gradients stay on the scale of the trained ones (Hewitt 2021, "Initializing new word embeddings").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn


def resize_vocab(model: nn.Module, vocab_size: int, *, eos_id: int | None = None) -> nn.Module:
    """A copy of `model` with `vocab_size` ids (>= its own): old rows kept, new rows the mean row."""
    from lmstack.model import build_model

    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(f"resize_vocab only grows the vocabulary ({old} -> {vocab_size})")
    changes: dict[str, Any] = {"vocab_size": vocab_size}
    if eos_id is not None:
        changes["eos_id"] = eos_id
    config = dataclasses.replace(model.config, **changes)
    new = build_model(config, device="meta", attn_impl=model.attn_impl)
    state = model.state_dict()
    for name in ("tok_emb.weight", "lm_head.weight"):
        if name in state:  # a tied head is stored once, as tok_emb.weight
            rows = state[name]
            extra = rows.mean(0, keepdim=True).expand(vocab_size - old, -1)
            state[name] = torch.cat([rows, extra])
    new.load_state_dict(state, assign=True)
    return new


def chat_ready_base(base: Path, out: Path) -> Path:
    """`base` itself when its tokenizer has a chat template; otherwise `out`, a copy of the base with the
    ChatML template and special tokens added (`with_chatml`) and the vocabulary grown to hold them,
    written once (a resumed run finds it)."""
    from lmstack.interop.folders import load_model_and_tokenizer
    from lmstack.interop.hf import save_pretrained
    from lmstack.tokenizer import Tokenizer
    from lmstack.tokenizer.chat import with_chatml

    tokenizer = Tokenizer.load(base)
    if tokenizer.chat_template:
        return base
    if (out / "config.json").is_file():
        return out
    model, tokenizer = load_model_and_tokenizer(base)
    chat = with_chatml(tokenizer)
    size = max(model.config.vocab_size, chat.vocab_size)
    model = resize_vocab(model, size, eos_id=chat.eos_id)
    return save_pretrained(model, out, tokenizer=chat)  # atomic: a crash leaves no half-written base


def added_token_ids(base: Path, chat: Path) -> tuple[int, ...]:
    """Ids of the special tokens `chat`'s tokenizer has and `base`'s lacks (the rows `chat_ready_base`
    added, which a frozen-embedding adapter must train: tokens.py)."""
    from lmstack.tokenizer import Tokenizer

    before = set(Tokenizer.load(base).special_tokens.values())
    return tuple(sorted(i for i in Tokenizer.load(chat).special_tokens.values() if i not in before))
