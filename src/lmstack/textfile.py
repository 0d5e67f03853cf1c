"""The one check every command applies to a text file it is given: it exists, is a file, is text.

"Text" means what git and grep mean: no NUL byte in the first 8 KiB (a NUL there is a binary file's
signature, and UTF-8 text never needs one), valid UTF-8, and not empty. Each error names the file and
the fix, so `lmstack tokenizer train --input`, `lmstack train --data`, `lmstack eval --data` and data
extraction refuse the same files with the same words. Settings files (`--config`: YAML or JSON) are
read by `read_settings_file`, so every config loader words its errors alike.
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path
from typing import Any

from lmstack.errors import InputError

BINARY_SNIFF_BYTES = 8192


def looks_binary(data: bytes) -> bool:
    """A NUL byte in the first 8 KiB: the rule git and grep use to call a file binary."""
    return b"\x00" in data[:BINARY_SNIFF_BYTES]


def utf8_error(path: Path, exc: UnicodeDecodeError, offset: int = 0) -> InputError:
    return InputError(
        f"{path} is not UTF-8 text (bad byte near offset {offset + exc.start}: {exc.reason}) — convert it, "
        f"e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt`"
    )


def check_text_file(path: str | os.PathLike, *, what: str = "input file") -> Path:
    """Refuse a missing path, a folder, a binary file or an empty one, reading only its first 8 KiB.

    For files streamed later (tokenizer training); `read_text_file` checks a whole file it reads.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path} — check the path")
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory — pass the text files inside it")
    with path.open("rb") as f:
        head = f.read(BINARY_SNIFF_BYTES)
        complete = not f.read(1)
    if looks_binary(head):
        raise InputError(
            f"{what} {path} looks binary (it holds NUL bytes) — pass UTF-8 text (extract text from other "
            "formats first, e.g. with `lmstack data`)"
        )
    try:
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(head, final=complete)
    except UnicodeDecodeError as exc:
        raise utf8_error(path, exc) from None
    if complete and not text.strip():
        raise InputError(f"{what} {path} is empty — pass a file with text in it")
    return path


def read_text_file(path: str | os.PathLike, *, what: str = "input file") -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped), after `check_text_file`'s checks."""
    path = check_text_file(path, what=what)
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise utf8_error(path, exc) from None


def read_settings_file(path: str | os.PathLike, *, what: str = "config file") -> dict[str, Any]:
    """The mapping a YAML (`.yaml`/`.yml`) or JSON settings file holds; errors name the file and the fix."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"cannot read {what} {path}: no such file — check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {what} {path}: {exc} — give a UTF-8 YAML or JSON file") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
        raise InputError(
            f"cannot parse {what} {path}: {' '.join(str(exc).split())} — fix its syntax"
        ) from None
    if not isinstance(values, dict):
        raise InputError(f"{what} {path} must hold a mapping of settings (key: value) — fix its contents")
    return values
