"""The vocabulary: which bytes each id stands for, and which pair of ids each merge joins.

In a tokenizer we train, ids 0-255 are the bytes in order, merge i joins two earlier ids into id 256 + i,
and special tokens come last. An imported vocabulary (GPT-2, Llama-3, Qwen2) numbers things its own way,
so the general form kept here is: the id of each byte value, the merges as (left, right, new id) in
rank order, optional extra tokens no merge produces, and the special / added tokens.

`build_vocab` checks that all of this is consistent (every merge joins ids that exist and makes their bytes, ids are not
reused with different bytes, specials do not collide). Those checks are also how a corrupt or hand-edited
tokenizer file is caught on load.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from lmstack.errors import InputError


class Vocab(NamedTuple):
    byte_ids: list[int]  # byte value -> id
    merges: list[tuple[int, int, int]]  # (left, right, new id) in rank order
    ranks: dict[tuple[int, int], tuple[int, int]]  # (left, right) -> (rank, new id)
    id_bytes: list[bytes | None]  # id -> bytes (None for an unused id); specials give their UTF-8
    bytes_to_id: dict[bytes, int]  # the inverse, for ordinary (non-special) tokens
    specials: dict[str, int]  # special token -> id (matched only where allowed)
    added: dict[str, int]  # non-special added tokens of imported vocabularies (always matched)


def build_vocab(
    merges: Sequence[Sequence[int]],
    special_tokens: Sequence[str] | Mapping[str, int] = (),
    byte_ids: Sequence[int] | None = None,
    extra_tokens: Mapping[int, bytes] | None = None,
    added_tokens: Mapping[str, int] | None = None,
    rank_by_token_id: bool = False,
) -> Vocab:
    """Check and index a vocabulary. `merges` are (left, right) pairs making id 256 + i, or triples.

    `special_tokens` given as a list get ids after every other token, in order. A merge's rank is its
    place in the list; with `rank_by_token_id` it is the id of the token it makes (tiktoken's rule:
    every pair whose bytes form token T merges with priority T, ties going to the leftmost pair).
    """
    byte_ids = list(range(256)) if byte_ids is None else [int(i) for i in byte_ids]
    if len(byte_ids) != 256 or len(set(byte_ids)) != 256 or min(byte_ids) < 0:
        raise InputError("byte_ids must list 256 distinct non-negative ids, one per byte value")
    table: dict[int, bytes] = {i: bytes([b]) for b, i in enumerate(byte_ids)}
    # An imported vocabulary gives every token's bytes up front, and its merge list only ranks pairs:
    # real files (Llama-3) list merges whose parts a later merge makes, and several merges making one
    # token. So the extra tokens go in first and merges are resolved in passes until none is left.
    for token_id, data in (extra_tokens or {}).items():
        if table.setdefault(int(token_id), bytes(data)) != bytes(data):
            raise InputError(f"extra token {token_id} collides with another token")
    checked: list[tuple[int, int, int]] = [
        (*merge, 256 + rank) if len(merge) == 2 else tuple(merge) for rank, merge in enumerate(merges)
    ]
    pending = list(range(len(checked)))
    while pending:
        waiting = []
        for rank in pending:
            left, right, new_id = checked[rank]
            if left not in table or right not in table:
                waiting.append(rank)
                continue
            joined = table[left] + table[right]
            if table.setdefault(new_id, joined) != joined:
                raise InputError(f"merge {rank} gives id {new_id} bytes that differ from its other uses")
        if len(waiting) == len(pending):
            left, right, _ = checked[waiting[0]]
            raise InputError(
                f"merge {waiting[0]} ({left}, {right}) uses an id that no byte, vocabulary token or merge defines"
            )
        pending = waiting
    ranks = {
        (left, right): (new_id if rank_by_token_id else rank, new_id)
        for rank, (left, right, new_id) in enumerate(checked)
    }
    if len(ranks) != len(checked):
        raise InputError("the same pair appears twice in the merges — the merge list is corrupt")
    bytes_to_id = {data: i for i, data in table.items()}

    if isinstance(special_tokens, Mapping):
        specials = {str(s): int(i) for s, i in special_tokens.items()}
    else:
        if not all(isinstance(s, str) for s in special_tokens):
            raise InputError("special tokens must be non-empty strings, e.g. '<|endoftext|>'")
        first = max(table) + 1
        specials = {s: first + k for k, s in enumerate(dict.fromkeys(special_tokens))}
        if len(specials) != len(special_tokens):
            raise InputError("special tokens must be distinct — remove the duplicates")
    added = {str(s): int(i) for s, i in (added_tokens or {}).items()}
    for text, token_id in {**specials, **added}.items():
        if not text:
            raise InputError("special tokens must be non-empty strings")
        if token_id in table or token_id < 0:
            raise InputError(f"special token {text!r} has id {token_id}, already used by another token")
        table[token_id] = text.encode("utf-8")
    id_bytes: list[bytes | None] = [None] * (max(table) + 1)
    for token_id, data in table.items():
        id_bytes[token_id] = data
    return Vocab(byte_ids, checked, ranks, id_bytes, bytes_to_id, specials, added)


def extra_tokens(vocab: Vocab) -> dict[int, bytes]:
    """Ordinary tokens that are neither a byte nor made by a merge (possible only when imported)."""
    made = set(vocab.byte_ids) | {new_id for _, _, new_id in vocab.merges}
    special = set(vocab.specials.values()) | set(vocab.added.values())
    return {
        i: data
        for i, data in enumerate(vocab.id_bytes)
        if data is not None and i not in made and i not in special
    }


def identity(vocab: Vocab, pattern: str, normalizer: Any, ignore_merges: bool) -> dict[str, Any]:
    """Everything that decides the ids of a text, as plain JSON data."""
    return {
        "byte_ids": vocab.byte_ids,
        "merges": [list(m) for m in vocab.merges],
        "extra_tokens": {str(i): data.hex() for i, data in extra_tokens(vocab).items()},
        "special_tokens": vocab.specials,
        "added_tokens": vocab.added,
        "pattern": pattern,
        "normalizer": normalizer,
        "ignore_merges": ignore_merges,
    }


def content_hash(identity_data: dict[str, Any]) -> str:
    """A stable sha256 (hex) of `identity(...)`: canonical JSON, sorted keys, no spaces."""
    canonical = json.dumps(identity_data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()
