"""Stage 2 — quality filtering with simple, explainable heuristics.

Web-scale pipelines (Gopher's "MassiveText" rules, C4, RefinedWeb) drop most low-quality text with a
handful of document statistics before any model-based filter. Each heuristic here is a pure function
of the text returning a number; `QualityConfig` holds the thresholds; `filter_quality` applies the
checks in a fixed order and counts, per check, how many documents it removed (a document is counted
by the first check it fails, so the counts add up to the number removed).

The defaults are loose enough to keep prose, Shakespeare and Python's own documentation (code samples
included) while removing tables of numbers, symbol soup, boilerplate that repeats a line over and
over, and decoded binary.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from lmstack.data.extract import Document


@dataclass(frozen=True)
class QualityConfig:
    min_chars: int = 64  # shorter documents carry too little context to learn from
    max_symbol_ratio: float = 0.40  # share of non-space characters that are neither letters nor digits
    max_digit_ratio: float = 0.25  # share of non-space characters that are digits
    max_duplicate_line_fraction: float = 0.30  # share of line characters in lines seen earlier in the doc
    max_non_text_ratio: float = 0.01  # share of characters that are control characters or U+FFFD


def non_space_chars(text: str) -> int:
    return sum(1 for c in text if not c.isspace())


def symbol_ratio(text: str) -> float:
    """Non-space characters that are neither letters nor digits, over all non-space characters."""
    total = non_space_chars(text)
    if not total:
        return 0.0
    return sum(1 for c in text if not c.isspace() and not c.isalnum()) / total


def digit_ratio(text: str) -> float:
    total = non_space_chars(text)
    return sum(1 for c in text if c.isdigit()) / total if total else 0.0


def duplicate_line_fraction(text: str) -> float:
    """Characters in non-blank lines that repeat an earlier line of the same document, over characters
    in all non-blank lines (Gopher's "duplicate line character fraction"). Weighing by characters
    keeps short repeated lines such as a play's speaker names from condemning a document."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    total = sum(len(line) for line in lines)
    if not total:
        return 0.0
    seen: Counter[str] = Counter()
    repeated = 0
    for line in lines:
        if seen[line]:
            repeated += len(line)
        seen[line] += 1
    return repeated / total


def non_text_ratio(text: str) -> float:
    """Control characters (other than tab, newline, carriage return) and the U+FFFD replacement
    character left by undecodable bytes, over all characters: the signature of binary data."""
    if not text:
        return 0.0
    bad = sum(1 for c in text if c == "\ufffd" or (unicodedata.category(c) == "Cc" and c not in "\t\n\r"))
    return bad / len(text)


def quality_checks(config: QualityConfig) -> list[tuple[str, Callable[[str], bool]]]:
    """(name, passes) for each check, in the order they run: cheap and decisive ones first."""
    return [
        ("too_short", lambda t: len(t.strip()) >= config.min_chars),
        ("non_text", lambda t: non_text_ratio(t) <= config.max_non_text_ratio),
        ("symbol_ratio", lambda t: symbol_ratio(t) <= config.max_symbol_ratio),
        ("digit_ratio", lambda t: digit_ratio(t) <= config.max_digit_ratio),
        ("duplicate_lines", lambda t: duplicate_line_fraction(t) <= config.max_duplicate_line_fraction),
    ]


def failed_check(text: str, config: QualityConfig) -> str | None:
    """Name of the first check `text` fails, or None if it passes them all."""
    for name, passes in quality_checks(config):
        if not passes(text):
            return name
    return None


def filter_quality(docs: list[Document], config: QualityConfig) -> tuple[list[Document], dict[str, int]]:
    """Keep the documents passing every check; return them and the count removed by each check."""
    removed = {name: 0 for name, _ in quality_checks(config)}
    kept = []
    for doc in docs:
        reason = failed_check(doc.text, config)
        if reason is None:
            kept.append(doc)
        else:
            removed[reason] += 1
    return kept, removed
