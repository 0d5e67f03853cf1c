"""Shared helpers for the data tests: a byte-level stand-in tokenizer and small crafted corpora."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest


class ByteTokenizer:
    """Ids are UTF-8 bytes, EOS is 256: enough of the tokenizer interface for the pipeline."""

    eos_id = 256
    vocab_size = 257

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8")

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "byte_tokenizer.json").write_text(json.dumps({"kind": "bytes", "eos_id": 256}))


WORDS = (
    "the of and to in is was for on that with as by at from his her it an be this are which or had "
    "river mountain garden window letter castle engine harbour forest village market bridge lantern "
    "quietly slowly bright ancient northern hidden silver golden broken gentle sudden distant narrow "
    "walked carried opened painted counted watched followed gathered answered remembered"
).split()


def prose(seed: int, n_words: int = 120) -> str:
    """Deterministic English-looking text: sentences of common words, distinct per seed."""
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < n_words:
        k = rng.randint(6, 14)
        words = [rng.choice(WORDS) for _ in range(k)]
        sentences.append(" ".join(words).capitalize() + ".")
        count += k
    lines, line = [], ""
    for sentence in sentences:
        if len(line) + len(sentence) > 70:
            lines.append(line.strip())
            line = ""
        line += " " + sentence
    lines.append(line.strip())
    return "\n".join(lines)


@pytest.fixture
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def prose_dir(tmp_path: Path) -> Path:
    """A folder of 40 distinct prose documents (one .txt file each)."""
    folder = tmp_path / "prose"
    folder.mkdir()
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(prose(i) + "\n")
    return folder


@pytest.fixture
def make_prose():
    return prose
