"""Pre-tokenization: cut text into the pieces that BPE merges inside of, never across.

A byte-level BPE never merges across a pre-token boundary, so the split pattern decides what a token
can be: with the GPT-2 pattern `" the"` (space + word) is one piece and can become one token, while a
word and the punctuation after it never share a token. GPT-4's cl100k pattern refines this: numbers are
cut into runs of at most three digits, and a newline run is kept apart from the indentation after it.

Both built-in patterns are written so that the three engines we check against agree on them: Python's
`regex` module (ours), tiktoken's Rust `fancy-regex`, and Oniguruma inside Hugging Face `tokenizers`.
That is why "gpt4" is the form Llama-3 ships (`\\p{N}{1,3}` without tiktoken's newer possessive `{1,3}+`,
which Oniguruma reads as "repeat the repeat" and splits differently).

This module also turns training inputs (documents or files) into a stream of pieces, so that training
memory is bounded by the number of distinct pieces, not by the size of the corpus.
"""

from __future__ import annotations

import codecs
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import regex

from lmstack.errors import InputError
from lmstack.textfile import check_text_file, utf8_error

# The GPT-2 pattern exactly as Hugging Face's ByteLevel pre-tokenizer (use_regex=True) applies it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's cl100k pattern, in the form Llama-3's tokenizer.json uses (see the module docstring).
GPT4_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# tiktoken's published encodings: split pattern and special tokens (the ranks come from the .tiktoken
# file). These patterns use possessive quantifiers, which `regex` and tiktoken read alike.
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s"""
)
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_ENDOFTEXT, _FIM = "<|endoftext|>", ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")
TIKTOKEN_ENCODINGS: dict[str, tuple[str, dict[str, int]]] = {
    "r50k_base": (R50K_PATTERN, {_ENDOFTEXT: 50256}),
    "p50k_base": (R50K_PATTERN, {_ENDOFTEXT: 50256}),
    "cl100k_base": (
        CL100K_PATTERN,
        {_ENDOFTEXT: 100257, **{t: 100258 + k for k, t in enumerate(_FIM)}, "<|endofprompt|>": 100276},
    ),
    "o200k_base": (O200K_PATTERN, {_ENDOFTEXT: 199999, "<|endofprompt|>": 200018}),
}
PATTERNS = {
    "gpt2": GPT2_PATTERN,
    "gpt4": GPT4_PATTERN,
    "cl100k": GPT4_PATTERN,
    "r50k_base": R50K_PATTERN,
    "cl100k_base": CL100K_PATTERN,
    "o200k_base": O200K_PATTERN,
}

# Files are read in blocks of this many bytes; only distinct pieces are kept in memory.
READ_BLOCK_BYTES = 1 << 20


def resolve_pattern(pattern: str) -> str:
    """Return the regex for a built-in name ("gpt2", "gpt4"/"cl100k") or check a custom regex.

    A custom pattern must compile and must not match the empty string (that would cut nothing).
    Characters it does not match still reach the tokenizer, each gap as one piece of its own.
    """
    if not isinstance(pattern, str) or not pattern:
        raise InputError("pattern must be 'gpt2', 'gpt4' or a non-empty regex string")
    if pattern in PATTERNS:
        return PATTERNS[pattern]
    try:
        compiled = regex.compile(pattern)
    except regex.error as exc:
        raise InputError(
            f"invalid split pattern {pattern!r}: {exc} — pass 'gpt2', 'gpt4' or a valid regex"
        ) from None
    if compiled.match("") is not None:
        raise InputError(
            f"split pattern {pattern!r} matches the empty string — make every alternative consume a character"
        )
    return pattern


def pattern_name(pattern: str) -> str:
    """The built-in name of a pattern ("gpt2", "gpt4", or a tiktoken encoding's), or "custom"."""
    for name in ("gpt2", "gpt4", "r50k_base", "cl100k_base", "o200k_base"):
        if PATTERNS[name] == pattern:
            return name
    return "custom"


def split_pieces(compiled: regex.Pattern, text: str) -> list[str]:
    """All pieces of `text`, in order; text between matches (custom patterns only) is kept as a piece.

    The built-in patterns match every character, so their pieces are exactly `findall`; the length
    check makes that the fast path and falls back to a gap-keeping scan otherwise.
    """
    pieces = compiled.findall(text)
    if sum(map(len, pieces)) == len(text):
        return pieces
    pieces, end = [], 0
    for match in compiled.finditer(text):
        if match.start() > end:
            pieces.append(text[end : match.start()])
        pieces.append(match.group())
        end = match.end()
    if end < len(text):
        pieces.append(text[end:])
    return pieces


def special_splitter(specials: Iterable[str]) -> regex.Pattern | None:
    """A regex that finds any of `specials`, longest first (so `<|a|>x` wins over `<|a|>`)."""
    ordered = sorted(set(specials), key=lambda s: (-len(s), s))
    if not ordered:
        return None
    return regex.compile("|".join(regex.escape(s) for s in ordered))


# ---------------------------------------------------------------------------------------------------
# Streams of text -> pieces


def iter_pieces(
    blocks: Iterable[str], compiled: regex.Pattern, specials: Iterable[str] = ()
) -> Iterator[str]:
    """The pieces of the concatenated `blocks`, exactly as if the whole text were split at once.

    Special-token strings are cut out first and act as separators (as in tiktoken and Hugging Face,
    text never merges across a special token); they are not yielded.

    A block boundary can fall inside a piece, and the last pieces of a block can depend on what follows:
    `\\s+(?!\\S)` backs off one space before a word, and `\\s*[\\r\\n]+` swallows a whitespace tail
    once a newline arrives. Earlier pieces never look that far, so the last three pieces of each block
    are carried into the next block and split again. (Exact for the built-in patterns; the tests check
    it against splitting the whole text at once.)
    """
    specials = list(specials)
    splitter = special_splitter(specials)
    if splitter is not None:
        blocks = _special_safe_blocks(blocks, splitter, max(map(len, specials)))
    carry = ""
    for block in blocks:
        parts = splitter.split(block) if splitter is not None else [block]
        for part in parts[:-1]:  # ends at a special token: nothing follows it to look ahead to
            yield from split_pieces(compiled, carry + part)
            carry = ""
        pieces = split_pieces(compiled, carry + parts[-1])
        yield from pieces[:-3]
        carry = "".join(pieces[-3:])
    if carry:
        yield from split_pieces(compiled, carry)


def _special_safe_blocks(blocks: Iterable[str], splitter: regex.Pattern, longest: int) -> Iterator[str]:
    """Re-cut blocks so that no special-token string straddles two of them."""
    pending = ""
    for block in blocks:
        text = pending + block
        cut = max(len(text) - (longest - 1), 0)  # a special starting before `cut`...
        for match in splitter.finditer(text, max(cut - longest, 0)):
            if match.start() < cut < match.end():  # ...but ending after it moves the cut to its start
                cut = match.start()
                break
        yield text[:cut]
        pending = text[cut:]
    if pending:
        yield pending


def count_pieces(
    inputs: Iterable[str] | Iterable[os.PathLike] | os.PathLike,
    pattern: str,
    specials: Iterable[str] = (),
) -> Counter[str]:
    """Count the distinct pieces of a corpus: documents (strings) or text files (paths).

    Memory is bounded by the number of distinct pieces: files are streamed in blocks and documents
    one at a time. Special-token strings are separators and are not counted: they get their own ids
    and must not shape the merges.
    """
    compiled = regex.compile(pattern)
    specials = list(specials)
    counts: Counter[str] = Counter()
    for blocks in iter_training_texts(inputs):
        counts.update(iter_pieces(blocks, compiled, specials))
    return counts


def iter_training_texts(inputs: Iterable[str | Path] | str | Path) -> Iterator[Iterable[str]]:
    """Yield each independent text as an iterable of blocks: a document as one block, a file streamed.

    `inputs` is a path (one file), a list of paths (`pathlib.Path`, or strings naming existing files),
    or any iterable of strings (documents, e.g. a generator over a dataset).
    """
    if isinstance(inputs, os.PathLike):
        inputs = [inputs]
    elif isinstance(inputs, str):
        raise InputError("inputs is a single string — pass [text] for one document or [path] for one file")
    as_files = isinstance(inputs, (list, tuple)) and _are_paths(list(inputs))
    if as_files:  # fail before hours of work on the files in front of a missing one
        for path in inputs:
            check_text_file(path)
    for item in inputs:
        if as_files or isinstance(item, os.PathLike):
            yield iter_file_text(item)
        elif isinstance(item, str):
            yield (item,)
        else:
            raise InputError(
                f"training inputs must be strings (documents) or file paths, got {type(item).__name__}"
            )


def _are_paths(items: list) -> bool:
    """Decide whether a list holds file paths (PathLike, or strings naming existing files) or documents.

    A list of strings where only some name files is ambiguous, so it is an error rather than a guess.
    """
    if all(isinstance(x, os.PathLike) for x in items):
        return True
    if not all(isinstance(x, str) for x in items):
        return False
    exists = [("\n" not in x and len(x) < 4096 and os.path.isfile(x)) for x in items]
    if all(exists):
        return True
    if any(exists):
        missing = next(x for x, ok in zip(items, exists) if not ok)
        raise InputError(
            f"input file not found: {missing[:200]!r} — check the path (or pass pathlib.Path objects for "
            "files and plain strings for documents, not a mix)"
        )
    return False


def iter_file_text(path: str | os.PathLike, block_bytes: int = READ_BLOCK_BYTES) -> Iterator[str]:
    """Yield the text of a UTF-8 file in blocks (a leading BOM dropped, line endings kept as they are).

    Checks happen on first use (`lmstack.textfile.check_text_file`: exists, not a folder, no NUL bytes,
    not empty), so a bad file fails with a message naming it; bad UTF-8 later in the file fails too.
    """
    path = check_text_file(path)
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
    offset = 0
    with path.open("rb") as f:
        while True:
            block = f.read(block_bytes)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                raise utf8_error(path, exc, offset) from None
            if text:
                yield text
            if not block:
                return
            offset += len(block)
