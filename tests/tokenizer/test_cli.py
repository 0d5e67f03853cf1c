"""`lmstack tokenizer train | encode | stats` through the real dispatcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmstack.cli import main
from lmstack.tokenizer import Tokenizer, measure_file, measure_text

WORDS = "before we proceed any further hear me speak all resolved rather to die than famish citizen".split()
TEXT = "".join(
    f"{WORDS[i % 15].title()} Citizen {i}:\n{' '.join(WORDS[(i * 7) % 15 :])}, speak.\n"
    f"Wie geht's? 東京 🎉 {i * 7919} <|endoftext|>\n"
    for i in range(60)
)


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # the dispatcher's one-line error path
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_train_encode_stats(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_dir = tmp_path / "tok"
    code, out, _ = run(
        capsys,
        "tokenizer",
        "train",
        "--input",
        str(corpus),
        "--vocab-size",
        "400",
        "--out",
        str(out_dir),
        "--special",
        "<|endoftext|>",
        "<|im_start|>",
        "--no-progress",
    )
    assert code == 0 and "trained 400-id tokenizer" in out and "2 specials" in out
    tok = Tokenizer.load(out_dir)
    assert tok.vocab_size == 400 and tok.special_tokens == {"<|endoftext|>": 398, "<|im_start|>": 399}
    assert f"content_hash {tok.content_hash}" in out
    assert (
        Tokenizer.train([corpus], 400, special_tokens=["<|endoftext|>", "<|im_start|>"]).content_hash
        == tok.content_hash
    )

    code, out, _ = run(capsys, "tokenizer", "encode", "--tokenizer", str(out_dir), "Speak, 東京 🦜")
    ids = tok.encode("Speak, 東京 🦜")
    assert code == 0 and out.splitlines()[0] == f"{len(ids)} tokens: {ids}"
    assert "'Speak'" in out and "b'\\x9f'" in out  # a whole word, and a partial emoji shown as bytes

    code, out, _ = run(
        capsys, "tokenizer", "encode", "--tokenizer", str(out_dir), "--allow-special", "hi<|endoftext|>"
    )
    assert code == 0 and "398  '<|endoftext|>'" in out

    code, out, _ = run(capsys, "tokenizer", "stats", "--tokenizer", str(out_dir), str(corpus))
    stats = measure_text(tok, TEXT)
    assert code == 0 and f"tokens      {stats.tokens:,}" in out
    assert f"({stats.chars_per_token:.2f} per token)" in out and "tokens per word" in out


def test_gpt2_and_custom_patterns(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for pattern in ("gpt2", r"\w+|\s+|[^\w\s]+"):
        out_dir = tmp_path / pattern[:4]
        code, out, _ = run(
            capsys,
            "tokenizer",
            "train",
            "--input",
            str(corpus),
            "--vocab-size",
            "300",
            "--out",
            str(out_dir),
            "--pattern",
            pattern,
        )
        assert code == 0
        assert Tokenizer.load(out_dir).pattern_name == ("gpt2" if pattern == "gpt2" else "custom")


def test_measure_file_equals_measure_text(tmp_path: Path) -> None:
    tok, text = Tokenizer.train([TEXT], 350), TEXT + "   trailing words\n\n  x"
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    assert measure_file(tok, path) == measure_text(tok, text)
    # tiny blocks: words and pieces cut by block boundaries must still count once
    assert measure_file(tok, path, block_bytes=7) == measure_text(tok, text)
    assert measure_text(tok, text).chars_per_token > 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--input", "{tmp}/missing.txt", "--vocab-size", "300", "--out", "{tmp}/o"],
            "input file not found: .*missing.txt",
        ),
        (
            ["train", "--input", "{corpus}", "--vocab-size", "100", "--out", "{tmp}/o"],
            "vocab size 100 is too small",
        ),
        (["train", "--input", "{latin1}", "--vocab-size", "300", "--out", "{tmp}/o"], "not UTF-8 text"),
        (
            ["train", "--input", "{binary}", "--vocab-size", "300", "--out", "{tmp}/o"],
            "input file .*binary.bin looks binary \\(it holds NUL bytes\\) — pass UTF-8 text",
        ),
        (["train", "--input", "{empty}", "--vocab-size", "300", "--out", "{tmp}/o"], "empty.txt is empty"),
        (["train", "--input", "{tmp}", "--vocab-size", "300", "--out", "{tmp}/o"], "is a directory"),
        (
            ["train", "--input", "{corpus}", "--vocab-size", "300", "--out", "{tmp}/o", "--pattern", "(("],
            "invalid split pattern",
        ),
        (["train", "--input", "{corpus}", "--vocab-size", "300", "--out", "{corpus}"], "is not a folder"),
        (["encode", "--tokenizer", "{tmp}/none", "hi"], "tokenizer folder not found"),
        (
            ["encode", "--tokenizer", "{tok}", "a <|endoftext|>"],
            "special token .<\\|endoftext\\|>. at index 2 — pass --allow-special",
        ),
        (["encode", "--tokenizer", "{bad}", "hi"], "lmstack_tokenizer.json is corrupt"),
        (["stats", "--tokenizer", "{tok}", "{tmp}/missing.txt"], "input file not found"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    argv: list[str], message: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import re

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9")
    (tmp_path / "binary.bin").write_bytes(b"text at first\x00\x01\x02 then binary")
    (tmp_path / "empty.txt").write_text(" \n")
    tok_dir = Tokenizer.train([TEXT], 300, special_tokens=["<|endoftext|>"]).save(tmp_path / "tok")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "lmstack_tokenizer.json").write_text(json.dumps({"format": "lmstack_tokenizer", "version": 1}))
    names = {
        "tmp": tmp_path,
        "corpus": corpus,
        "latin1": latin1,
        "binary": tmp_path / "binary.bin",
        "empty": tmp_path / "empty.txt",
        "tok": tok_dir,
        "bad": bad,
    }
    code, out, err = run(capsys, "tokenizer", *[a.format(**names) for a in argv])
    assert code == 2 and out == ""
    assert err.startswith("lmstack: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err
