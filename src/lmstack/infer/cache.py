"""KV caches: dynamic, static, hybrid (static, doubling when full), rolling (sliding window) and paged.

Each cache implements the model's `KVCache` protocol (src/lmstack/model/attention.py): the model hands
it one layer's new keys and values with their absolute positions and validity, and gets back every
key the call's queries may attend to, with positions and validity. Visibility is decided by the one
rule in `masks.sees`, from positions, so a cache may keep keys in any slot order (the rolling cache
wraps around, the paged cache scatters them over blocks) as long as it reports where each key sits.

Three ways to hold a KV cache: a dynamic cache grows by concatenation (simple, but every step reallocates and
copies); a static cache preallocates a maximum length (no allocation while decoding); the hybrid we
use is a static cache resized by doubling when full, so copies happen O(log n) times.
Slots a static cache has not filled yet are never handed to attention: the cache returns a view of
its filled prefix, which is equivalent to masking them and cheaper.

Positions and validity are the same for every layer of one forward call, so each cache plans the
call once in `begin` (write slots, the key positions and validity every layer attends over, room
reserved or grown, the fill length advanced) and each layer's `update` only writes and reads.
All caches can `truncate` (speculative decoding rolls back rejected draft tokens) and all but the
paged one can `reorder` their batch rows (beam search, contrastive search).
"""

from __future__ import annotations

import math

import torch

from lmstack.config import ModelConfig
from lmstack.errors import InputError, RunError

CACHE_KINDS = ("dynamic", "static", "hybrid", "rolling", "paged")


class CacheFull(RunError):
    """A cache (or the paged block pool) has no room for the tokens of this call."""


class _LayerwiseCache:
    """Storage shared by the caches: per-layer keys and values, one row of positions and validity.
    Each cache also reports `memory_bytes()`: bytes held by key/value storage (allocated, not merely used)."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.seen_tokens = 0  # slots filled per row (padding included); the model's default position offset

    # Subclasses keep per-layer `k`, `v` lists (entries may be None before the first call) and
    # `pos`/`valid` (B, S) tensors (`valid` None when every slot is real).
    k: list[torch.Tensor | None]
    v: list[torch.Tensor | None]
    pos: torch.Tensor | None
    valid: torch.Tensor | None

    def reorder(self, index: torch.Tensor) -> None:
        """Rows become `index`-selected rows (beam search); `index` may repeat rows or change the batch size."""
        self.k = [None if t is None else t.index_select(0, index) for t in self.k]
        self.v = [None if t is None else t.index_select(0, index) for t in self.v]
        if self.pos is not None:
            self.pos = self.pos.index_select(0, index)
            self.valid = None if self.valid is None else self.valid.index_select(0, index)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class DynamicCache(_LayerwiseCache):
    """Grows by concatenation along the sequence axis: no maximum length, a reallocation per step."""

    def __init__(self, n_layers: int):
        super().__init__(n_layers)
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.pos: torch.Tensor | None = None  # (B, S)
        self.valid: torch.Tensor | None = None  # (B, S) or None when every slot is a real token

    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        self.valid = _cat_valid(self.valid, valid, self.pos, positions)
        self.pos = positions if self.pos is None else torch.cat((self.pos, positions), 1)  # (B, S + T)
        self.seen_tokens += positions.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        old_k, old_v = self.k[layer], self.v[layer]
        self.k[layer] = k if old_k is None else torch.cat((old_k, k), 2)  # (B, KV, S + T, D)
        self.v[layer] = v if old_v is None else torch.cat((old_v, v), 2)
        return self.k[layer], self.v[layer], self.pos, self.valid

    def truncate(self, n: int) -> None:
        """Keep the first `n` slots (drop rejected speculative tokens)."""
        _check_truncate(n, self.seen_tokens)
        self.k = [None if t is None else t[:, :, :n] for t in self.k]
        self.v = [None if t is None else t[:, :, :n] for t in self.v]
        if self.pos is not None:
            self.pos = self.pos[:, :n]
            self.valid = None if self.valid is None else self.valid[:, :n]
        self.seen_tokens = n


class StaticCache(_LayerwiseCache):
    """Preallocated (B, KV, max_len, D) per layer; `growable=True` makes it the hybrid cache that doubles.

    Writing is an in-place copy into the next free slots, so decoding allocates nothing. Only the
    filled prefix is returned to attention.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        growable: bool = False,
    ):
        super().__init__(config.n_layers)
        self.growable = growable
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.pos = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.has_padding = False  # while False, k_valid is returned as None (no mask work for padding)

    @property
    def capacity(self) -> int:
        return self.pos.shape[1]

    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        start, end = self.seen_tokens, self.seen_tokens + positions.shape[1]
        if end > self.capacity:
            if not self.growable:
                raise CacheFull(
                    f"static KV cache holds {self.capacity} tokens, this call needs {end} — "
                    "build it with a larger max_len or use cache='hybrid'"
                )
            self._grow(end)
        self.pos[:, start:end] = positions
        if valid is not None:
            self.valid[:, start:end] = valid
            self.has_padding = self.has_padding or not bool(valid.all())
        else:
            self.valid[:, start:end] = True
        self._span = (start, end)
        self.seen_tokens = end

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start, end = self._span
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        k_valid = self.valid[:, :end] if self.has_padding else None
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], self.pos[:, :end], k_valid

    def _grow(self, needed: int) -> None:
        # Hybrid policy (geometric growth): double, so n tokens cost O(log n) reallocations instead of n.
        new_len = max(2 * self.capacity, needed)
        for store in (self.k, self.v):
            for layer, old in enumerate(store):
                store[layer] = old.new_zeros(old.shape[:2] + (new_len, old.shape[3]))
                store[layer][:, :, : old.shape[2]] = old
        pos, valid = self.pos, self.valid
        self.pos = pos.new_zeros(pos.shape[0], new_len)
        self.valid = valid.new_ones(valid.shape[0], new_len)
        self.pos[:, : pos.shape[1]], self.valid[:, : valid.shape[1]] = pos, valid

    def truncate(self, n: int) -> None:
        _check_truncate(n, self.seen_tokens)
        self.seen_tokens = n


class RollingCache(_LayerwiseCache):
    """A ring buffer of `window + extra` slots for sliding-window models (Mistral).

    A query at position i sees keys i - window < j <= i (`masks.sees`), so older keys can be
    overwritten. The `extra` slots cover speculative decoding: verifying k draft tokens writes k + 1
    keys in one call, and rolling back the rejected ones must not have overwritten a key the next
    query still needs, which holds when capacity >= window + k. A call of T tokens writes in place when
    T + window - 1 <= capacity (every query of the call still finds its window in the ring); a longer
    call (a long prompt) attends over the ring plus the new keys, then keeps the newest in the ring.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        extra: int = 0,
        window: int | None = None,
    ):
        super().__init__(config.n_layers)
        window = window or config.sliding_window
        if window is None:
            raise InputError(
                "a rolling KV cache needs a sliding-window model — use cache='static' or 'hybrid'"
            )
        self.window, self.extra = window, extra
        self.size = window + extra
        shape = (batch_size, config.n_kv_heads, self.size, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.pos = torch.zeros(batch_size, self.size, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, self.size, dtype=torch.bool, device=device)

    def _slots(self, start: int, count: int) -> torch.Tensor:
        return torch.arange(start, start + count, device=self.pos.device) % self.size

    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        B, T = positions.shape
        self._in_place = T + self.window - 1 <= self.size
        keep = min(T, self.size)  # the newest `keep` keys of this call stay in the ring
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=positions.device)
        if not self._in_place:
            self._call_pos = torch.cat((self.pos, positions), 1)
            self._call_valid = torch.cat((self.valid, valid), 1)
        self._write = self._slots(self.seen_tokens + T - keep, keep)
        self.pos[:, self._write] = positions[:, T - keep :]
        self.valid[:, self._write] = valid[:, T - keep :]
        if self._in_place:
            self._call_pos, self._call_valid = self.pos, self.valid
        self.seen_tokens += T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        keep, T = len(self._write), k.shape[2]
        if self._in_place:
            out_k, out_v = self.k[layer], self.v[layer]  # the in-place writes below land in these
        else:
            out_k, out_v = torch.cat((self.k[layer], k), 2), torch.cat((self.v[layer], v), 2)
        self.k[layer].index_copy_(2, self._write, k[:, :, T - keep :])
        self.v[layer].index_copy_(2, self._write, v[:, :, T - keep :])
        return out_k, out_v, self._call_pos, self._call_valid

    def truncate(self, n: int) -> None:
        """Forget the newest `seen_tokens - n` writes; at most `extra + 1` can be undone without loss."""
        _check_truncate(n, self.seen_tokens)
        drop = self.seen_tokens - n
        if drop > self.extra + 1 and self.seen_tokens > self.size:  # the dropped writes overwrote needed keys
            raise InputError(
                f"a rolling cache with {self.extra} extra slots cannot roll back {drop} tokens — "
                "build it with extra >= the speculation depth"
            )
        if drop:
            self.valid[:, self._slots(n, drop)] = False
        self.seen_tokens = n


class BlockAllocator:
    """A free list of fixed-size KV blocks; sequences take blocks as they grow and return them when done."""

    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        self._free = list(range(n_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.n_blocks - len(self._free)

    def allocate(self) -> int | None:
        return self._free.pop() if self._free else None

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedCache:
    """Keys and values in a pool of fixed-size blocks, one block table per sequence (vLLM's PagedAttention).

    A sequence's slot i lives at `table[i // block_size] * block_size + i % block_size` of the pool, so
    memory grows a block at a time and a finished sequence's blocks go straight back to the allocator.
    The pool keeps each slot's position and validity too, which lets left-padded batches use it.

    Before a model call, `bind(seq_ids)` chooses which sequences the batch rows are; `begin` then
    allocates the blocks the call needs and plans each row's write slots, and `update` writes each
    layer's new keys there and gathers each row's keys into a padded (B, KV, S, D) tensor for attention. The gather is what a paged-attention kernel
    avoids on GPU; here it keeps the model's attention code unchanged.
    """

    def __init__(
        self,
        config: ModelConfig,
        n_blocks: int,
        block_size: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ):
        if n_blocks <= 0 or block_size <= 0:
            raise InputError(
                f"paged cache needs n_blocks > 0 and block_size > 0, got {n_blocks}, {block_size}"
            )
        self.n_layers, self.block_size = config.n_layers, block_size
        self.allocator = BlockAllocator(n_blocks)
        n_slots = n_blocks * block_size
        # (block, slot in block, KV, D): a sequence's keys are gathered a whole block at a time
        shape = (n_blocks, block_size, config.n_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.slot_pos = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.slot_valid = torch.zeros(n_slots, dtype=torch.bool, device=device)
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.rows: list[int] = []

    # ---- sequence management ----------------------------------------------------------------
    def add(self, seq_id: int) -> None:
        self.tables[seq_id], self.lengths[seq_id] = [], 0

    def blocks_needed(self, seq_id: int, n_new: int) -> int:
        """Blocks a sequence must still obtain to hold `n_new` more tokens."""
        total = self.lengths[seq_id] + n_new
        return max(0, math.ceil(total / self.block_size) - len(self.tables[seq_id]))

    def reserve(self, seq_id: int, n_new: int) -> bool:
        """Allocate blocks so `n_new` more tokens fit; False (nothing allocated) when the pool is short."""
        need = self.blocks_needed(seq_id, n_new)
        if need > self.allocator.free:
            return False
        self.tables[seq_id].extend(self.allocator.allocate() for _ in range(need))
        return True

    def free(self, seq_id: int) -> None:
        """Return a sequence's blocks to the pool (finished, cancelled or preempted)."""
        self.allocator.release(self.tables.pop(seq_id, []))
        self.lengths.pop(seq_id, None)

    def bind(self, seq_ids: list[int]) -> PagedCache:
        """Make batch row b of the next model calls be sequence `seq_ids[b]`; returns self."""
        self.rows = list(seq_ids)
        return self

    @property
    def seen_tokens(self) -> int:
        return self.lengths[self.rows[0]] if self.rows else 0

    def truncate(self, n: int, seq_id: int | None = None) -> None:
        """Keep the first `n` slots of one sequence (every bound row when `seq_id` is None); frees spare blocks."""
        for sid in [seq_id] if seq_id is not None else self.rows:
            _check_truncate(n, self.lengths[sid])
            self.lengths[sid] = n
            keep = math.ceil(n / self.block_size)
            self.allocator.release(self.tables[sid][keep:])
            del self.tables[sid][keep:]

    @property
    def blocks_in_use(self) -> int:
        return self.allocator.used

    def memory_bytes(self) -> int:
        """Bytes of the blocks in use (the pool itself is preallocated once)."""
        per_block = sum(t[0].numel() * t.element_size() for t in self.k + self.v)
        return self.allocator.used * per_block

    # ---- the KVCache protocol ------------------------------------------------------------------
    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Reserve blocks, choose write slots, list each row's blocks to gather, advance the lengths."""
        B, T = positions.shape
        if len(self.rows) != B:
            raise InputError(
                f"paged cache is bound to {len(self.rows)} sequences but the batch has {B} rows — call bind()"
            )
        for sid in self.rows:
            if not self.reserve(sid, T):
                raise CacheFull(
                    f"KV block pool exhausted ({self.allocator.n_blocks} blocks) — raise kv_blocks"
                )
        device, bs = self.slot_pos.device, self.block_size
        lengths = [self.lengths[sid] for sid in self.rows]
        n_tables = max(len(self.tables[sid]) for sid in self.rows)
        # short rows borrow block 0 to fill the table; those slots lie past the row's length, masked below
        tables = torch.tensor(
            [self.tables[sid] + [0] * (n_tables - len(self.tables[sid])) for sid in self.rows], device=device
        )
        starts = torch.tensor(lengths, device=device)
        new = starts[:, None] + torch.arange(T, device=device)  # (B, T) logical indices written now
        self._write = (tables.gather(1, new // bs) * bs + new % bs).reshape(-1)
        self.slot_pos[self._write] = positions.reshape(-1)
        self.slot_valid[self._write] = True if valid is None else valid.reshape(-1)
        # gather whole blocks, then keep the columns up to the longest row (a single row: exactly its keys)
        S = max(lengths) + T
        self._blocks = tables.reshape(-1)
        slot_pos, slot_valid = self.slot_pos.view(-1, bs), self.slot_valid.view(-1, bs)
        self._call_pos = slot_pos[self._blocks].view(B, -1)[:, :S]
        in_range = torch.arange(S, device=device)[None, :] < (starts + T)[:, None]
        k_valid = slot_valid[self._blocks].view(B, -1)[:, :S] & in_range
        self._call_valid = None if bool(k_valid.all()) else k_valid
        self._S = S
        for sid in self.rows:
            self.lengths[sid] += T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        B, KV, T, D = k.shape
        outputs = []
        for pool, new in ((self.k[layer], k), (self.v[layer], v)):
            flat = pool.view(-1, KV, D)  # (slots, KV, D)
            flat.index_copy_(0, self._write, new.transpose(1, 2).reshape(B * T, KV, D))
            rows = pool.index_select(0, self._blocks).view(B, -1, KV, D)[:, : self._S]  # (B, S, KV, D)
            outputs.append(rows.transpose(1, 2))  # -> (B, KV, S, D)
        return outputs[0], outputs[1], self._call_pos, self._call_valid


def make_cache(
    kind: str,
    config: ModelConfig,
    batch_size: int,
    max_len: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    extra: int = 0,
    block_size: int = 16,
):
    """Build a cache by name for `batch_size` rows of up to `max_len` slots.

    `extra` is the speculation depth a rolling cache must be able to roll back. A paged cache built
    here gets exactly the blocks the batch needs and is bound to rows 0..B-1.
    """
    if kind == "dynamic":
        return DynamicCache(config.n_layers)
    if kind == "static":
        return StaticCache(config, batch_size, max_len, dtype=dtype, device=device)
    if kind == "hybrid":  # start small; doubling reaches max_len in log2 steps
        return StaticCache(config, batch_size, min(max_len, 256), dtype=dtype, device=device, growable=True)
    if kind == "rolling":
        if config.sliding_window is None:
            raise InputError("cache='rolling' needs a sliding-window model — use cache='static' or 'hybrid'")
        return RollingCache(config, batch_size, dtype=dtype, device=device, extra=extra)
    if kind == "paged":
        n_blocks = batch_size * math.ceil(max_len / block_size)
        cache = PagedCache(config, n_blocks, block_size, dtype=dtype, device=device)
        for row in range(batch_size):
            cache.add(row)
        return cache.bind(list(range(batch_size)))
    raise InputError(f"unknown cache {kind!r} — use one of {', '.join(CACHE_KINDS)}")


def _cat_valid(old_valid, new_valid, old_pos, new_pos):
    if old_valid is None and new_valid is None:
        return None
    if old_pos is None:
        return new_valid
    old = old_valid if old_valid is not None else torch.ones_like(old_pos, dtype=torch.bool)
    new = new_valid if new_valid is not None else torch.ones_like(new_pos, dtype=torch.bool)
    return torch.cat((old, new), 1)


def _check_truncate(n: int, length: int) -> None:
    if not 0 <= n <= length:
        raise InputError(f"cannot truncate a cache of {length} tokens to {n} — use 0 <= n <= {length}")
