"""The pipeline with the real BPE tokenizer (skipped where `lmstack.tokenizer` is not available)."""

import numpy as np
import pytest

from lmstack.data.pipeline import load_dataset_info, prepare_dataset
from lmstack.data.shards import open_shard

try:  # the tokenizer is another area of the package; these tests wait for it to be importable
    import lmstack.tokenizer as tokenizer_module
except ImportError as exc:
    pytest.skip(f"lmstack.tokenizer is not importable: {exc}", allow_module_level=True)


def documents_of(path, tok):
    _, tokens = open_shard(path)
    pieces = np.split(np.asarray(tokens), np.flatnonzero(tokens == tok.eos_id) + 1)[:-1]
    return [tok.decode(p[:-1].tolist()) for p in pieces]


def test_trained_tokenizer_round_trip_and_stable_version(prose_dir, tmp_path):
    first = prepare_dataset([prose_dir], tmp_path / "a", vocab_size=300)
    second = prepare_dataset([prose_dir], tmp_path / "b", vocab_size=300)
    assert first.version == second.version
    tok = tokenizer_module.Tokenizer.load(first.tokenizer_path)
    assert tok.vocab_size == first.vocab_size == 300 and tok.eos_id == first.eos_id
    inputs = {p.read_text().strip() for p in prose_dir.iterdir()}
    val = documents_of(first.val_path, tok)
    train = documents_of(first.train_path, tok)
    assert set(val) | set(train) == inputs and not set(val) & set(train)
    assert sum(len(t.encode()) for t in val) == first.val_text_bytes


def test_reusing_a_tokenizer_folder_gives_the_same_shards(prose_dir, tmp_path):
    trained = prepare_dataset([prose_dir], tmp_path / "a", vocab_size=300)
    given = prepare_dataset([prose_dir], tmp_path / "b", tokenizer=trained.tokenizer_path)
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()
    assert given == load_dataset_info(tmp_path / "b") and given.vocab_size == 300
