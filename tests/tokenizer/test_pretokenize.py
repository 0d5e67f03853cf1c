"""Pre-tokenization: built-in patterns, custom patterns, and streaming files in blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import regex
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmstack.tokenizer.pretokenize import (
    GPT2_PATTERN,
    GPT4_PATTERN,
    count_pieces,
    iter_file_text,
    iter_pieces,
    pattern_name,
    resolve_pattern,
    split_pieces,
)

CI = settings.get_profile("ci")  # tests/conftest.py: bounded, no deadline, derandomized

# characters that stress the split rules: whitespace kinds, newlines, letters, digits, marks, emoji
TRICKY = st.text(
    st.sampled_from(
        list(" \t\n\r\x0b\x0c\xa0\u3000  aZé'sStTdD0123456789½.,!?-_*(#") + ["中", "😀", "\u0301"]
    ),
    max_size=60,
)


def test_builtin_patterns() -> None:
    assert resolve_pattern("gpt2") == GPT2_PATTERN
    assert resolve_pattern("gpt4") == resolve_pattern("cl100k") == GPT4_PATTERN
    assert pattern_name(GPT4_PATTERN) == "gpt4" and pattern_name(r"\S+|\s+") == "custom"
    gpt4 = regex.compile(GPT4_PATTERN)
    assert split_pieces(gpt4, "I'M here  1234567\n\n    x") == [
        "I",
        "'M",
        " here",
        " ",
        " ",
        "123",
        "456",
        "7",
        "\n\n",
        "   ",
        " x",
    ]
    gpt2 = regex.compile(GPT2_PATTERN)
    assert split_pieces(gpt2, "it's 1234567 !!") == ["it", "'s", " 1234567", " !!"]


def test_custom_pattern_keeps_unmatched_text() -> None:
    compiled = regex.compile(resolve_pattern(r"[a-z]+"))
    assert split_pieces(compiled, "ab, cd!") == ["ab", ", ", "cd", "!"]
    assert "".join(split_pieces(compiled, "ab, cd!")) == "ab, cd!"


@CI
@given(text=TRICKY, block=st.integers(1, 12), name=st.sampled_from(["gpt2", "gpt4"]))
@example(text="\n \t\t\n", block=4, name="gpt4")  # the newline arriving late joins the whole tail
@example(text="a\n \n \t\t\n", block=7, name="gpt4")
@example(text="x   y", block=4, name="gpt2")  # `\s+(?!\S)` backs off once the word arrives
def test_pieces_of_blocks_equal_pieces_of_whole_text(text: str, block: int, name: str) -> None:
    compiled = regex.compile(resolve_pattern(name))
    blocks = [text[i : i + block] for i in range(0, len(text), block)]
    assert list(iter_pieces(blocks, compiled)) == split_pieces(compiled, text)


@CI
@given(parts=st.lists(TRICKY, max_size=4), block=st.integers(1, 9))
def test_specials_are_separators_even_across_blocks(parts: list[str], block: int) -> None:
    compiled = regex.compile(GPT4_PATTERN)
    specials = ["<|endoftext|>", "<s>"]
    text = "<|endoftext|>".join(parts) + "<s>"
    blocks = [text[i : i + block] for i in range(0, len(text), block)]
    expected = [p for part in parts for p in split_pieces(compiled, part)]
    assert list(iter_pieces(blocks, compiled, specials)) == expected


def test_file_text_keeps_line_endings_and_drops_bom(tmp_path: Path) -> None:
    path = tmp_path / "crlf.txt"
    path.write_bytes("\ufeffline one\r\nline two é\r\n".encode())
    assert "".join(iter_file_text(path, block_bytes=3)) == "line one\r\nline two é\r\n"


def test_count_pieces_skips_specials_and_accepts_documents(tmp_path: Path) -> None:
    counts = count_pieces(["a b<|endoftext|>a b"], GPT4_PATTERN, ["<|endoftext|>"])
    assert counts == {"a": 2, " b": 2}
    path = tmp_path / "doc.txt"
    path.write_text("a b a b")
    assert (
        count_pieces(path, GPT4_PATTERN) == count_pieces([path], GPT4_PATTERN) == {"a": 1, " a": 1, " b": 2}
    )


def test_bad_patterns() -> None:
    from lmstack.errors import InputError

    with pytest.raises(InputError, match="invalid split pattern"):
        resolve_pattern("[")
    with pytest.raises(InputError, match="non-empty"):
        resolve_pattern("")
