"""Tokenizer.from_tiktoken on rank files written here (the real published files: test_real_files.py)."""

from __future__ import annotations

import base64
import random
from pathlib import Path

import pytest

from lmstack.errors import InputError
from lmstack.tokenizer import Tokenizer

tiktoken = pytest.importorskip("tiktoken")
from tiktoken.load import load_tiktoken_bpe  # noqa: E402

CORPUS = [
    "the cat sat on the mat; the rats ate 12345 oats, naïvely. " * 30,
    "def f(x):\n    return x * 2\n" * 20,
]
TEXTS = [
    "the cat ate the rats' mat",
    "naïve 12345678 oats\n\n  def f(y):\n\treturn y",
    "😀 unseen ウィキ text",
]


def write_ranks(path: Path, ranks: dict[bytes, int]) -> Path:
    lines = [
        f"{base64.b64encode(token).decode()} {rank}"
        for token, rank in sorted(ranks.items(), key=lambda x: x[1])
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train(CORPUS, 400, special_tokens=["<|endoftext|>"])


@pytest.mark.parametrize("shuffle", [False, True])
def test_ids_equal_tiktoken_built_from_the_same_file(
    trained: Tokenizer, tmp_path: Path, shuffle: bool
) -> None:
    ranks = {trained.id_to_bytes(i): i for i in range(trained.vocab_size - 1)}
    if shuffle:  # ranks that no BPE run would give: tiktoken's rule (merge by token rank) must still hold
        long = sorted((t for t in ranks if len(t) > 1), key=ranks.get)
        ids = [ranks[t] for t in long]
        random.Random(0).shuffle(ids)
        ranks.update(zip(long, ids))
    path = write_ranks(tmp_path / "x.tiktoken", ranks)
    specials = {"<|endoftext|>": 399}
    tok = Tokenizer.from_tiktoken(path, pattern="gpt4", special_tokens=specials)
    enc = tiktoken.Encoding(
        "x", pat_str=tok.pattern, mergeable_ranks=load_tiktoken_bpe(str(path)), special_tokens=specials
    )
    slow = Tokenizer.from_tiktoken(path, pattern="gpt4", special_tokens=specials)
    slow.use_tiktoken = False
    for text in [*TEXTS, *CORPUS]:
        expected = enc.encode(text + "<|endoftext|>", allowed_special="all")
        assert tok.encode(text + "<|endoftext|>", allowed_special="all") == expected
        assert slow.encode(text + "<|endoftext|>", allowed_special="all") == expected
        assert slow.decode(expected) == text + "<|endoftext|>"
    assert tok._fast_encoding() is not None and slow._cache
    reloaded = Tokenizer.load(slow.save(tmp_path / "saved"))
    reloaded.use_tiktoken = False
    assert reloaded.content_hash == slow.content_hash and reloaded.encode(TEXTS[1]) == slow.encode(TEXTS[1])


def test_named_encodings_and_bad_files(tmp_path: Path, trained: Tokenizer) -> None:
    path = write_ranks(tmp_path / "x.tiktoken", {trained.id_to_bytes(i): i for i in range(256)})
    tok = Tokenizer.from_tiktoken(path, name="cl100k_base", special_tokens={})
    assert tok.pattern_name == "cl100k_base"
    with pytest.raises(InputError, match="pass name="):
        Tokenizer.from_tiktoken(path)
    with pytest.raises(InputError, match="unknown tiktoken encoding 'gpt5'"):
        Tokenizer.from_tiktoken(path, name="gpt5")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot a line at all\n")
    with pytest.raises(InputError, match="bad.tiktoken line 2 is not `base64-token rank`"):
        Tokenizer.from_tiktoken(bad, name="r50k_base")
    short = write_ranks(tmp_path / "short.tiktoken", {b"a": 0, b"b": 1})
    with pytest.raises(InputError, match="lacks 254 of the 256 single-byte tokens"):
        Tokenizer.from_tiktoken(short, name="r50k_base")


def test_without_tiktoken_the_pure_path_gives_the_same_ids(trained: Tokenizer, monkeypatch) -> None:
    import importlib.util

    expected = trained.encode(TEXTS[1])
    assert trained._fast_encoding() is not None
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tiktoken" else real_find_spec(name, *a)
    )
    fresh = Tokenizer.train(CORPUS, 400, special_tokens=["<|endoftext|>"])
    assert fresh._fast_encoding() is None and fresh.encode(TEXTS[1]) == expected
