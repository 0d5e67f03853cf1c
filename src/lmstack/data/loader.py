"""Batches of token windows from a shard, for training (shuffled, resumable) and evaluation (in order).

Training: the shard is cut into W = ⌊(n − 1) / seq_len⌋ non-overlapping windows of seq_len + 1 tokens
(input and its one-step-shifted target). Think of an endless stream of window indices: epoch e is a
seeded permutation of 0..W−1, and epoch e+1 follows it. Global batch k is stream items
[k·B, (k+1)·B); with `world_size` processes, rank r takes the r-th slice of B / world_size of them. So

- a fixed seed fixes every batch (no state beyond one counter, `batches_served`);
- `world_size` ranks together see exactly the examples one process sees with the same global batch
  (the property a DDP-equals-single-process test needs), and a run may resume on a different number
  of ranks with the same global batch;
- every window is seen once per epoch, which matters for the small corpora this package trains on.

The permutation comes from sorting the SplitMix64 hashes of the window indices (Steele et al., 2014),
plain integer arithmetic rather than a library shuffle, so it is the same on every NumPy version.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmstack.data.shards import open_shard
from lmstack.errors import InputError

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def splitmix64_int(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * _M1) & _MASK64
    x = ((x ^ (x >> 27)) * _M2) & _MASK64
    return x ^ (x >> 31)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 finaliser on uint64 (NumPy array arithmetic wraps mod 2^64)."""
    x = x + np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
    return x ^ (x >> np.uint64(31))


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded permutation of range(n). SplitMix64 is a bijection, so the keys never tie."""
    key = splitmix64_int(splitmix64_int(seed & _MASK64) ^ (epoch & _MASK64))
    return np.argsort(splitmix64(np.arange(n, dtype=np.uint64) ^ np.uint64(key)), kind="stable")


def _windows_to_tensors(
    tokens: np.ndarray, starts: list[int], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(tokens[s : s + length + 1]) for s in starts]).astype(np.int64)  # (B, T+1)
    return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())  # (B, T) each


class TokenBatches:
    """Endless training batches `(x, y)`, int64 tensors of shape (batch_size // world_size, seq_len),
    where y is x shifted by one token: y[i, t] is the token that follows x[i, t] in the shard.

    `batch_size` is the *global* batch: each of `world_size` ranks gets its own slice of it.
    """

    def __init__(
        self,
        shard_path: str | Path,
        batch_size: int,
        seq_len: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise InputError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is not in range for world_size {world_size}")
        if batch_size % world_size:
            raise InputError(
                f"global batch_size {batch_size} does not split evenly over {world_size} processes "
                "— choose a multiple of the number of processes"
            )
        self.header, self.tokens = open_shard(shard_path)
        n = self.header.n_tokens
        if n < seq_len + 1:
            raise InputError(
                f"corpus smaller than one batch: {shard_path} holds {n} tokens but one training sequence "
                f"needs seq_len + 1 = {seq_len + 1} — give more text or a shorter context"
            )
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        self.n_windows = (n - 1) // seq_len
        self.batches_served = 0
        self._perm_epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    @property
    def epoch(self) -> float:
        """Passes over the training windows completed so far (fractional)."""
        return self.batches_served * self.batch_size / self.n_windows

    def _window(self, item: int) -> int:
        epoch, index = divmod(item, self.n_windows)
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = epoch_permutation(self.n_windows, self.seed, epoch), epoch
        return int(self._perm[index])

    def __iter__(self) -> TokenBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.batches_served * self.batch_size + self.rank * self.local_batch_size
        starts = [self._window(i) * self.seq_len for i in range(first, first + self.local_batch_size)]
        self.batches_served += 1
        return _windows_to_tensors(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict[str, int]:
        """The position in the stream plus what it depends on (all ints, JSON-able)."""
        return {
            "batches_served": self.batches_served,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "n_tokens": self.header.n_tokens,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        ours = self.state_dict()
        for key in ("seed", "batch_size", "seq_len", "n_tokens"):
            if key in state and int(state[key]) != ours[key]:
                raise InputError(
                    f"cannot resume the data position: it was saved with {key}={state[key]}, this run has "
                    f"{key}={ours[key]} — resume with the same data and batch settings"
                )
        self.batches_served = int(state["batches_served"])


def eval_batches(
    shard_path: str | Path,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows of the shard, in order, `batch_size` per batch (the last
    batch may be smaller). The final < seq_len tokens that do not fill a window are left out; a shard
    shorter than one window gives a single shorter window. With `world_size` > 1, rank r takes
    batches r, r + world_size, ... so the ranks together cover the same batches as one process."""
    if batch_size < 1 or seq_len < 1:
        raise InputError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    header, tokens = open_shard(shard_path)
    n = header.n_tokens
    if n < 2:
        raise InputError(f"{shard_path} holds {n} tokens; evaluation needs at least 2 — give more text")
    length = min(seq_len, n - 1)
    n_windows = (n - 1) // length
    n_batches = -(-n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(rank, n_batches, world_size):
        windows = range(b * batch_size, min((b + 1) * batch_size, n_windows))
        yield _windows_to_tensors(tokens, [w * length for w in windows], length)
