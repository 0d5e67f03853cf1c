"""The incremental BPE trainer against the plain recount-every-merge reference (DESIGN rule 15)."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import pytest
import regex

from lmstack.errors import InputError
from lmstack.tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer
from lmstack.tokenizer.trainer import train_merges

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"
SOURCES = Path(__file__).resolve().parents[2] / "src" / "lmstack"

MULTILINGUAL = (
    "The quick brown fox jumps over the lazy dog. Le cœur a ses raisons que la raison ne connaît point. "
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. Съешь же ещё этих мягких французских булок. "
    "我能吞下玻璃而不伤身体。 私はガラスを食べられます。 나는 유리를 먹을 수 있어요. "
    "Ἐν ἀρχῇ ἦν ὁ λόγος. مرحبا بالعالم. नमस्ते दुनिया. 🎉🎉 👩‍💻 🇫🇷 1234567890 3.14159\n"
)


def reference_train(docs: list[str], vocab_size: int, pattern: str, specials: tuple[str, ...] = ()) -> list:
    """The textbook loop: recount every pair after every merge; highest count, ties to the smallest pair."""
    words: Counter[tuple[int, ...]] = Counter()
    for doc in docs:
        for part in regex.split("|".join(map(regex.escape, specials)), doc) if specials else [doc]:
            for piece in regex.findall(pattern, part):
                words[tuple(piece.encode("utf-8"))] += 1
    merges = []
    for new_id in range(256, vocab_size - len(specials)):
        stats: Counter[tuple[int, int]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                stats[pair] += count
        if not stats:
            break
        best = min(stats, key=lambda pair: (-stats[pair], pair))
        merges.append(best)
        merged: Counter[tuple[int, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def fast_merges(tok: Tokenizer) -> list[tuple[int, int]]:
    return [(left, right) for left, right, _ in tok.merges]


def small_corpora() -> dict[str, list[str]]:
    code = "".join(p.read_text(encoding="utf-8") for p in sorted(SOURCES.glob("tokenizer/*.py")))[:30_000]
    corpora = {
        "multilingual": [MULTILINGUAL * 3, MULTILINGUAL.upper()],
        "code": [code],
        "repeats": ["aaaaaaa bbbb aaaa abab ababab " * 5, "zzzzzzzzz aaaa\n\n\n   \t\t  x", "a" * 50],
    }
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text(encoding="utf-8")
        corpora["shakespeare"] = [text[:25_000], text[600_000:620_000]]
    return corpora


@pytest.mark.parametrize("name", sorted(small_corpora()))
def test_fast_trainer_matches_reference(name: str) -> None:
    docs = small_corpora()[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "repeats" runs out of pairs before the target
        tok = Tokenizer.train(docs, 512, pattern="gpt4")
    assert fast_merges(tok) == reference_train(docs, 512, GPT4_PATTERN)


def test_fast_trainer_matches_reference_gpt2_pattern_and_specials() -> None:
    specials = ("<|endoftext|>", "<|im_start|>")
    docs = [f"{MULTILINGUAL}<|endoftext|>Hello <|im_start|>user it's 12345 o'clock<|endoftext|>" * 2]
    tok = Tokenizer.train(docs, 400, pattern="gpt2", special_tokens=specials)
    assert fast_merges(tok) == reference_train(docs, 400, GPT2_PATTERN, specials)
    # specials follow the merges and are counted in vocab_size
    assert tok.vocab_size == 400
    assert tok.special_tokens == {"<|endoftext|>": 398, "<|im_start|>": 399}
    assert all(new_id == 256 + rank for rank, (_, _, new_id) in enumerate(tok.merges))


def test_fast_trainer_matches_reference_on_files(tmp_path: Path) -> None:
    paths = []
    for i, doc in enumerate([MULTILINGUAL * 4, "def f(x):\r\n    return x  \n\n\n" * 20]):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_bytes(doc.encode("utf-8"))
    tok = Tokenizer.train(paths, 450)
    docs = [p.read_bytes().decode("utf-8") for p in paths]  # no newline translation
    assert fast_merges(tok) == reference_train(docs, 450, GPT4_PATTERN)
    assert Tokenizer.train([str(p) for p in paths], 450).content_hash == tok.content_hash


def test_tie_rule_smallest_pair_wins() -> None:
    # (b, a), (a, b) ... every pair occurs equally often; the smallest pair (97, 98) = "ab" goes first
    assert train_merges([(b"ab", 1), (b"ba", 1), (b"cd", 1)], 3) == [(97, 98), (98, 97), (99, 100)]
    assert train_merges([(b"xy", 1), (b"ab", 2)], 1) == [(97, 98)]  # the count wins over the pair


def test_overlapping_pairs_merge_left_to_right() -> None:
    merges = train_merges([(b"aaaaa", 1)], 3)
    # aaaaa -> (aa)(aa)a; then (aa, aa) x1 and (aa, a) x1 tie -> smallest pair (256, 97)
    assert merges == reference_train(["aaaaa"], 259, r"\S+")
    assert merges[0] == (97, 97)


def test_generator_of_documents() -> None:
    def docs():  # a generator: consumed once, never materialized by the trainer
        for i in range(500):
            yield f"document {i}: the cat sat on the mat {i * i}.\n"

    tok = Tokenizer.train(docs(), 300)
    assert fast_merges(tok) == reference_train(list(docs()), 300, GPT4_PATTERN)


def test_runs_out_of_pairs_warns_and_stops() -> None:
    with pytest.warns(UserWarning, match="ran out of pairs"):
        tok = Tokenizer.train(["ab ab ab"], 1000)
    assert tok.vocab_size == 256 + len(tok.merges)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_size": 255}, "at least 256"),
        (
            {"vocab_size": 257, "special_tokens": ["<a>", "<b>"]},
            r"at least 256 \(one id per byte\) \+ 2 special",
        ),
        ({"vocab_size": 300, "special_tokens": ["<a>", "<a>"]}, "distinct"),
        ({"vocab_size": 300, "special_tokens": [""]}, "non-empty"),
        ({"vocab_size": "300"}, "too small"),
        ({"vocab_size": 300, "pattern": "(unclosed"}, "invalid split pattern"),
        ({"vocab_size": 300, "pattern": r"\w*"}, "matches the empty string"),
    ],
)
def test_bad_training_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        Tokenizer.train(["some text"], **kwargs)


def test_bad_training_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="input file not found: .*missing.txt"):
        Tokenizer.train([tmp_path / "missing.txt"], 300)
    with pytest.raises(InputError, match="is a directory"):
        Tokenizer.train([tmp_path], 300)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.txt is not UTF-8 text \(bad byte near offset 3.*iconv"):
        Tokenizer.train([latin1], 300)
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.raises(InputError, match="input file not found"):
        Tokenizer.train([str(tmp_path / "ok.txt"), str(tmp_path / "nope.txt")], 300)
    with pytest.raises(InputError, match="single string"):
        Tokenizer.train("just a string", 300)
    with pytest.raises(InputError, match="no text"):
        Tokenizer.train(["", ""], 300)
    with pytest.raises(InputError, match="lone surrogate"):
        Tokenizer.train(["ok \ud800 bad"], 300)
    with pytest.raises(InputError, match="strings .* or file paths"):
        Tokenizer.train([b"bytes"], 300)
