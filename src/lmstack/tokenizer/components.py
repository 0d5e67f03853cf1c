"""Normalizers and pre-tokenizers of Hugging Face `tokenizer.json` files, as pure functions.

A `tokenizer.json` describes its text pipeline as data: a normalizer (NFC, lowercase, ...) and a chain of
pre-tokenizers that cut the text into the pieces BPE merges inside of. This module reads those specs and
returns plain functions with the same behaviour as `tokenizers`, for the components byte-level BPE files
use in practice:

    normalizers      NFC, NFKC, Lowercase, Sequence
    pre-tokenizers   ByteLevel (last), Split, Digits, Punctuation, Whitespace, WhitespaceSplit, Sequence

Anything else is refused with an error naming the component, rather than guessed.

Every pre-tokenizer is a split with one of five behaviours (how `tokenizers` defines them): the text is cut
into alternating matches and gaps, then

    isolated              every match and every gap is its own piece
    removed               matches are dropped, gaps kept
    merged_with_previous  a match is glued to the piece before it
    merged_with_next      a match is glued to the piece after it
    contiguous            consecutive matches (and consecutive gaps) form one piece

and `invert` swaps which parts count as matches. Empty pieces are dropped.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import regex

from lmstack.errors import InputError
from lmstack.tokenizer.pretokenize import GPT2_PATTERN

Pieces = list[str]
PreTokenizer = Callable[[str], Pieces]
Normalizer = Callable[[str], str]

BEHAVIOURS = ("isolated", "removed", "merged_with_previous", "merged_with_next", "contiguous")
# Character classes of `tokenizers`' built-in pre-tokenizers. Rust's `char::is_numeric` is the Unicode N
# category; its punctuation test is Unicode P or ASCII punctuation (which includes symbols like `$+<=>^|~`).
_NUMERIC = regex.compile(r"\p{N}")
_PUNCTUATION = regex.compile(r"[\p{P}!-/:-@\[-`{-~]")
_WHITESPACE_CHAR = regex.compile(r"\p{White_Space}")
_WORDS_OR_SYMBOLS = regex.compile(r"\w+|[^\w\s]+")
_GPT2 = regex.compile(GPT2_PATTERN)


# ---------------------------------------------------------------------------------------------------
# normalizers


def _lowercase(text: str) -> str:
    # `tokenizers` lowercases character by character, so a final Σ stays σ (str.lower() would give ς).
    return text.lower() if text.isascii() else "".join(c.lower() for c in text)


def _unicode_form(form: str, text: str) -> str:
    return text if text.isascii() else unicodedata.normalize(form, text)


NORMALIZERS: dict[str, Normalizer] = {
    "NFC": partial(_unicode_form, "NFC"),
    "NFKC": partial(_unicode_form, "NFKC"),
    "Lowercase": _lowercase,
}


def compile_normalizer(spec: str | Mapping[str, Any] | None, source: str = "tokenizer") -> Normalizer | None:
    """The function of a normalizer spec: a name ("NFC", "NFKC", "Lowercase"), a tokenizer.json dict, or None."""
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = {"type": spec}
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [compile_normalizer(step, source) for step in spec.get("normalizers") or []]
        steps = [s for s in steps if s is not None]
        if not steps:
            return None
        if len(steps) == 1:
            return steps[0]

        def sequence(text: str) -> str:
            for step in steps:
                text = step(text)
            return text

        return sequence
    if kind in NORMALIZERS:
        return NORMALIZERS[kind]
    raise InputError(
        f"{source}: unsupported normalizer {kind!r} ({_short(spec)}) — lmstack supports "
        f"{', '.join(NORMALIZERS)} and Sequence; load this tokenizer with the `tokenizers` library instead"
    )


# ---------------------------------------------------------------------------------------------------
# splitting with a behaviour


def find_matches(pattern: regex.Pattern, text: str) -> list[tuple[int, int, bool]]:
    """`text` cut into (start, end, is_match) spans: every match of `pattern` and the gaps between."""
    spans, end = [], 0
    for match in pattern.finditer(text):
        start, stop = match.span()
        if start > end:
            spans.append((end, start, False))
        spans.append((start, stop, True))
        end = stop
    if end < len(text):
        spans.append((end, len(text), False))
    return spans


def split(text: str, pattern: regex.Pattern, behaviour: str, invert: bool = False) -> Pieces:
    """Cut `text` at the matches of `pattern` with one of the five behaviours (module docstring)."""
    spans = [(s, e, m != invert) for s, e, m in find_matches(pattern, text)]
    if behaviour == "removed":
        return [text[s:e] for s, e, m in spans if not m and e > s]
    merged: list[list[int]] = []
    if behaviour == "isolated":
        merged = [[s, e] for s, e, _ in spans]
    elif behaviour in ("contiguous", "merged_with_previous"):
        previous = False
        for s, e, m in spans:
            glue = m == previous if behaviour == "contiguous" else (m and not previous)
            if glue and merged:
                merged[-1][1] = e
            else:
                merged.append([s, e])
            previous = m
    elif behaviour == "merged_with_next":
        previous = False
        for s, e, m in reversed(spans):
            if m and not previous and merged:
                merged[-1][0] = s
            else:
                merged.append([s, e])
            previous = m
        merged.reverse()
    else:
        raise ValueError(behaviour)
    return [text[s:e] for s, e in merged if e > s]


# ---------------------------------------------------------------------------------------------------
# pre-tokenizers


def _behaviour(spec: Mapping[str, Any], source: str, default: str = "isolated") -> str:
    raw = spec.get("behavior", default)
    name = regex.sub(r"(?<!^)([A-Z])", r"_\1", str(raw)).lower()  # "MergedWithNext" -> "merged_with_next"
    if name not in BEHAVIOURS:
        raise InputError(f"{source}: unsupported split behaviour {raw!r} — one of {', '.join(BEHAVIOURS)}")
    return name


def _split_pattern(spec: Mapping[str, Any], source: str) -> regex.Pattern:
    pattern = spec.get("pattern") or {}
    try:
        if "Regex" in pattern:
            return regex.compile(pattern["Regex"])
        if "String" in pattern:
            return regex.compile(regex.escape(pattern["String"]))
    except regex.error as exc:
        raise InputError(f"{source}: Split regex {pattern['Regex']!r} does not compile here: {exc}") from None
    raise InputError(f"{source}: Split pre-tokenizer without a Regex or String pattern ({_short(spec)})")


def _step(spec: Mapping[str, Any], source: str) -> Callable[[str], Pieces]:
    """One non-ByteLevel pre-tokenizer as a function of one piece."""
    kind = spec.get("type")
    if kind == "Split":
        return partial(
            split,
            pattern=_split_pattern(spec, source),
            behaviour=_behaviour(spec, source),
            invert=bool(spec.get("invert", False)),
        )
    if kind == "Digits":
        behaviour = "isolated" if spec.get("individual_digits") else "contiguous"
        return partial(split, pattern=_NUMERIC, behaviour=behaviour)
    if kind == "Punctuation":
        return partial(split, pattern=_PUNCTUATION, behaviour=_behaviour(spec, source))
    if kind == "Whitespace":  # keep runs of word characters and runs of other non-space characters
        return partial(split, pattern=_WORDS_OR_SYMBOLS, behaviour="removed", invert=True)
    if kind == "WhitespaceSplit":
        return partial(split, pattern=_WHITESPACE_CHAR, behaviour="removed")
    raise InputError(
        f"{source}: unsupported pre-tokenizer {kind!r} ({_short(spec)}) — lmstack supports ByteLevel, Split, "
        "Digits, Punctuation, Whitespace, WhitespaceSplit and Sequence; load this tokenizer with `tokenizers`"
    )


def _byte_level(piece: str, add_prefix_space: bool, use_regex: bool) -> Pieces:
    """ByteLevel's cutting part (the byte -> character mapping is implicit: lmstack's BPE works on bytes)."""
    if add_prefix_space and not piece.startswith(" "):
        piece = " " + piece
    return split(piece, _GPT2, "isolated") if use_regex else [piece]


def flatten(spec: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """The pre-tokenizer steps of a spec, nested Sequences flattened."""
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [step for inner in spec.get("pretokenizers") or [] for step in flatten(inner)]
    return [spec]


def compile_pre_tokenizer(spec: Mapping[str, Any] | None, source: str = "tokenizer") -> PreTokenizer:
    """The function text -> pieces of a byte-level pre-tokenizer spec (a tokenizer.json dict).

    The chain must end in ByteLevel (what makes the vocabulary byte-level); every step before it is
    applied to each piece the previous steps produced.
    """
    steps = flatten(spec)
    if not steps or steps[-1].get("type") != "ByteLevel":
        raise InputError(
            f"{source}: the pre-tokenizer {_short(spec)} does not end in ByteLevel — lmstack imports only "
            "byte-level BPE tokenizers"
        )
    for step in steps[:-1]:
        if step.get("type") == "ByteLevel":
            raise InputError(f"{source}: ByteLevel must be the last pre-tokenizer ({_short(spec)})")
    last = steps[-1]
    functions = [_step(step, source) for step in steps[:-1]]
    functions.append(
        partial(
            _byte_level,
            add_prefix_space=bool(last.get("add_prefix_space", False)),
            use_regex=bool(last.get("use_regex", True)),
        )
    )

    def pre_tokenize(text: str) -> Pieces:
        pieces = [text] if text else []
        for function in functions:
            pieces = [out for piece in pieces for out in function(piece)]
        return pieces

    return pre_tokenize


def plain_pattern(spec: Mapping[str, Any] | None) -> str | None:
    """The one regex a pre-tokenizer spec amounts to, when it is just "split by a regex, isolated".

    `ByteLevel(use_regex=true)` alone is GPT-2's regex; `Split(regex, isolated)` + `ByteLevel(use_regex=
    false)` is Llama-3's and Qwen2's form. Such tokenizers keep the simple pattern form (and its tiktoken
    fast path); every other chain keeps its spec.
    """
    steps = flatten(spec)
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        return None
    last = steps[-1]
    if len(steps) == 1:
        return GPT2_PATTERN if last.get("use_regex", True) else None
    first = steps[0]
    regex_text = (first.get("pattern") or {}).get("Regex")
    if (
        len(steps) == 2
        and first.get("type") == "Split"
        and regex_text is not None
        and not first.get("invert")
        and first.get("behavior") == "Isolated"
        and not last.get("use_regex", True)
    ):
        return regex_text
    return None


def _short(spec: Any) -> str:
    return json.dumps(spec, ensure_ascii=False)[:200]
