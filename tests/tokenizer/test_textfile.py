"""lmstack.textfile: every command that reads a text file refuses the same files the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmstack.errors import InputError
from lmstack.textfile import check_text_file, read_text_file

CASES = [
    (b"\xef\xbb\xbfhello\n", None),
    (b"caf\xc3\xa9", None),
    (b"", "is empty"),
    (b"  \n\t", "is empty"),
    (b"abc\x00def", "looks binary"),
    (b"caf\xe9", "not UTF-8 text"),
]


@pytest.mark.parametrize("content, message", CASES)
def test_read_and_check_agree(tmp_path: Path, content: bytes, message: str | None) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes(content)
    if message is None:
        assert read_text_file(path) == content.decode("utf-8-sig") and check_text_file(path) == path
        return
    for check in (read_text_file, check_text_file):
        with pytest.raises(InputError, match=f"{path}.*{message}"):
            check(path, what="data file")


def test_missing_folder_and_late_bad_bytes(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="data file not found: .*nope.txt — check the path"):
        read_text_file(tmp_path / "nope.txt", what="data file")
    with pytest.raises(InputError, match="is a directory"):
        check_text_file(tmp_path)
    late = tmp_path / "late.txt"
    late.write_bytes(b"a" * 10_000 + b"\xff")
    check_text_file(late)  # the sniff reads the first 8 KiB only; reading the file finds the byte
    with pytest.raises(InputError, match="bad byte near offset 10000"):
        read_text_file(late)
