"""Which keys a query may see. One rule, used by every attention implementation, cache and count.

Positions, not tensor indices, decide visibility: a key at position j is visible to a query at
position i when it is a real token (not padding), j <= i (causal) and i - j < window (sliding window,
the convention of `transformers`' Mistral: the query sees itself and the window - 1 keys before it).
Working on positions lets one rule serve left-padded batches, caches that store keys out of order
(rolling, paged) and queries offset from the keys (cached decoding, speculative verification).

Packed rows (several documents in one sequence, positions restarting at each) add one condition:
a query sees only keys of its own segment (a document mask), so each document is computed exactly
as if it were alone while the row runs as one sequence.
"""

from __future__ import annotations

import torch


def sees(
    q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool = True, window: int | None = None
) -> torch.Tensor:
    """Boolean visibility for broadcastable query and key positions."""
    if not causal and window is None:
        return torch.ones(
            torch.broadcast_shapes(q_pos.shape, k_pos.shape), dtype=torch.bool, device=q_pos.device
        )
    allowed = k_pos <= q_pos if causal else None
    if window is not None:
        in_window = q_pos - k_pos < window
        allowed = in_window if allowed is None else allowed & in_window
    return allowed


def visible_keys(sequence_length: int, window: int | None) -> int:
    """How many keys the last query of a sequence sees: the KV-cache length a window needs."""
    return sequence_length if window is None else min(sequence_length, window)


def attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None,
    *,
    causal: bool = True,
    window: int | None = None,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense mask (B, 1, T, S): True where query t of sequence b may attend to key s. `segments` (B, T)
    (queries and keys the same tokens, T == S) restricts each query to keys of its own segment."""
    allowed = sees(q_pos[:, :, None], k_pos[:, None, :], causal=causal, window=window)  # (B, T, S)
    if k_valid is not None:
        allowed &= k_valid[:, None, :]
    if segments is not None:
        allowed &= segments[:, :, None] == segments[:, None, :]
    return allowed[:, None]


def visibility(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None,
    *,
    causal: bool = True,
    window: int | None = None,
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The mask attention applies, in its cheapest form: (mask (B, 1, T, S) or None, seen (B, 1, T, 1) or None).

    `mask` is None when every query sees every key (a decode step without padding), which lets the
    kernels skip masking. `seen` marks queries that see at least one key; it is None when all do. A
    query that sees nothing is allowed to attend everywhere, so its softmax stays finite, and the
    caller zeroes its output with `seen`. Two host syncs (`.all()`) decide the cheap cases; under
    `torch.compile` they are skipped, since a data-dependent branch would break the graph.
    """
    mask = attention_mask(q_pos, k_pos, k_valid, causal=causal, window=window, segments=segments)
    if torch.compiler.is_compiling():
        seen = mask.any(-1, keepdim=True)
        return mask | ~seen, seen
    if bool(mask.all()):
        return None, None
    seen = mask.any(-1, keepdim=True)
    if bool(seen.all()):
        return mask, None
    return mask | ~seen, seen


def positions_from_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) for a left-padded batch: each sequence counts from 0 at its first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
