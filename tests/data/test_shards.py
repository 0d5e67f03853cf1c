import struct

import numpy as np
import pytest

from lmstack.data.shards import HEADER_BYTES, MAGIC, open_shard, read_header, token_dtype, write_shard
from lmstack.errors import InputError


def test_round_trip_with_eos_after_each_document(tmp_path):
    docs = [[1, 2, 3], [], [4, 5]]
    header = write_shard(tmp_path / "a.bin", docs, vocab_size=1000, eos_id=999)
    assert header.n_tokens == 8 and header.dtype == np.uint16
    header2, tokens = open_shard(tmp_path / "a.bin")
    assert header2 == header
    assert isinstance(tokens, np.memmap)
    assert tokens.tolist() == [1, 2, 3, 999, 999, 4, 5, 999]
    assert (tmp_path / "a.bin").stat().st_size == HEADER_BYTES + 2 * 8
    assert not list(tmp_path.glob("*.tmp"))


def test_dtype_follows_vocabulary_size(tmp_path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    header = write_shard(tmp_path / "big.bin", [[70_000, 5]], vocab_size=100_000, eos_id=0)
    assert header.bytes_per_token == 4
    assert open_shard(tmp_path / "big.bin")[1].tolist() == [70_000, 5, 0]


def test_header_is_the_documented_layout(tmp_path):
    write_shard(tmp_path / "a.bin", [[7]], vocab_size=300, eos_id=256)
    raw = (tmp_path / "a.bin").read_bytes()
    assert raw[:8] == MAGIC
    assert struct.unpack("<IIQII", raw[8:32]) == (1, 2, 2, 300, 256)
    assert np.frombuffer(raw[32:], dtype="<u2").tolist() == [7, 256]


def test_out_of_vocabulary_token_refused_and_nothing_written(tmp_path):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        write_shard(tmp_path / "a.bin", [[1, 300]], vocab_size=300, eos_id=0)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda raw: raw[:20], "shorter than the 32-byte shard header"),
        (lambda raw: b"NOTASHRD" + raw[8:], "not an lmstack token shard"),
        (lambda raw: raw[:8] + struct.pack("<I", 9) + raw[12:], "format version 9"),
        (lambda raw: raw[:12] + struct.pack("<I", 3) + raw[16:], "3 bytes per token"),
        (lambda raw: raw[:-2], "truncated"),
        (lambda raw: raw + b"\0\0", "corrupt or truncated"),
    ],
)
def test_corrupt_or_truncated_shards_fail_clearly(tmp_path, corrupt, match):
    path = tmp_path / "a.bin"
    write_shard(path, [[1, 2, 3]], vocab_size=10, eos_id=9)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(InputError, match=match):
        read_header(path)


def test_missing_shard_names_the_fix(tmp_path):
    with pytest.raises(InputError, match="lmstack data prepare"):
        open_shard(tmp_path / "missing.bin")
