"""Binary token shards: a 32-byte header, then the token ids, memory-mapped for reading.

Layout (all integers little-endian):

    offset  size  field
    0       8     magic  b"LMSTOKS\\0"
    8       4     format version (uint32, currently 1)
    12      4     bytes per token (uint32): 2 = uint16, 4 = uint32
    16      8     number of tokens (uint64)
    24      4     vocabulary size (uint32)
    28      4     EOS token id (uint32)
    32      ...   the tokens, `number of tokens` × `bytes per token`

Tokens are uint16 when the vocabulary has at most 65,536 ids (half the disk and page cache of
uint32), else uint32. Every document is followed by the EOS id, so a training window that crosses a
document boundary sees where one text ends. The header makes a shard self-describing and lets a
truncated or foreign file fail loudly instead of being read as garbage tokens; the 32-byte header keeps
the token array aligned for `numpy.memmap`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmstack.atomic import atomic_open
from lmstack.errors import InputError

MAGIC = b"LMSTOKS\0"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQII")
HEADER_BYTES = HEADER.size  # 32: keeps the uint32 token array aligned
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
FLUSH_TOKENS = 1 << 20


@dataclass(frozen=True)
class ShardHeader:
    n_tokens: int
    bytes_per_token: int
    vocab_size: int
    eos_id: int
    version: int = FORMAT_VERSION

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.bytes_per_token]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (ids < 65,536), else uint32."""
    if vocab_size < 1:
        raise InputError(f"vocab_size must be positive, got {vocab_size}")
    return DTYPES[2] if vocab_size <= 2**16 else DTYPES[4]


def write_shard(
    path: str | Path, documents: Iterable[Sequence[int]], *, vocab_size: int, eos_id: int
) -> ShardHeader:
    """Write token documents, each followed by `eos_id`, atomically to `path`; return the header."""
    dtype = token_dtype(vocab_size)
    if not 0 <= eos_id < vocab_size:
        raise InputError(f"eos_id {eos_id} is outside the vocabulary of {vocab_size} ids")
    n_tokens = 0
    buffer: list[int] = []
    with atomic_open(path) as handle:
        handle.write(b"\0" * HEADER_BYTES)  # placeholder until the count is known

        def flush() -> None:
            array = np.asarray(buffer, dtype=np.int64)
            if array.size and (array.min() < 0 or array.max() >= vocab_size):
                bad = int(array.max() if array.max() >= vocab_size else array.min())
                raise ValueError(f"token id {bad} is outside the vocabulary of {vocab_size} ids")
            handle.write(array.astype(dtype).tobytes())
            buffer.clear()

        for ids in documents:
            buffer.extend(ids)
            buffer.append(eos_id)
            if len(buffer) >= FLUSH_TOKENS:
                n_tokens += len(buffer)
                flush()
        n_tokens += len(buffer)
        flush()
        header = ShardHeader(n_tokens, dtype.itemsize, vocab_size, eos_id)
        handle.seek(0)
        handle.write(HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, n_tokens, vocab_size, eos_id))
    return header


def read_header(path: str | Path) -> ShardHeader:
    """Parse and validate a shard's header against the file's size."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"token shard not found: {path} — run `lmstack data prepare` first")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise InputError(
            f"{path} is truncated: {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte shard header "
            "— re-run `lmstack data prepare`"
        )
    magic, version, width, n_tokens, vocab_size, eos_id = HEADER.unpack(raw)
    if magic != MAGIC:
        raise InputError(
            f"{path} is not an lmstack token shard (bad magic {magic!r}) — give a train.bin/val.bin"
        )
    if version != FORMAT_VERSION:
        raise InputError(
            f"{path} has shard format version {version}; this lmstack reads version {FORMAT_VERSION} "
            "— re-run `lmstack data prepare`"
        )
    if width not in DTYPES:
        raise InputError(f"{path} has a corrupt header: {width} bytes per token (expected 2 or 4)")
    expected = HEADER_BYTES + n_tokens * width
    if size != expected:
        raise InputError(
            f"{path} is corrupt or truncated: header says {n_tokens} tokens ({expected} bytes), file has "
            f"{size} bytes — re-run `lmstack data prepare`"
        )
    return ShardHeader(n_tokens, width, vocab_size, eos_id, version)


def open_shard(path: str | Path) -> tuple[ShardHeader, np.ndarray]:
    """The header and a read-only memory map of the tokens (nothing is read into memory yet)."""
    header = read_header(path)
    if header.n_tokens == 0:
        return header, np.zeros(0, dtype=header.dtype)
    tokens = np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_BYTES, shape=(header.n_tokens,))
    return header, tokens
