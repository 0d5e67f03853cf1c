"""Stage 4 — decontamination: drop training documents that overlap the evaluation sets.

A model that saw a benchmark's text during pre-training scores well on it for the wrong reason. Like
GPT-3 (Brown et al., 2020, appendix C) we call a training document contaminated when it shares any
n-gram of `n` consecutive normalised words (default 13) with an evaluation document, and drop it whole.
An evaluation item shorter than `n` words contributes its entire word sequence instead, so short
questions are still caught; items under 8 words ("Yes", "Paris") are ignored, since such common
phrases would otherwise remove every document that uses them.

Words are NFKC-normalised, lower-cased `\\w+` runs (the de-duplication stage's normalisation), so punctuation and spacing changes do not hide an overlap. The
n-grams live in an in-memory set of word tuples: membership is exact (no false positives), and since
only membership is asked, the result never depends on Python's hash seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.data.dedup import WORD, normalise
from lmstack.data.extract import Document

MIN_ITEM_WORDS = 8  # shorter eval items ("Yes", "Paris") are common phrases, not evidence of leakage


def words(text: str) -> list[str]:
    """Normalised words, the same normalisation as de-duplication (NFKC, lower case)."""
    return WORD.findall(normalise(text))


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


@dataclass
class EvalIndex:
    """The n-grams of the evaluation sets, grouped by length (n, plus shorter whole items)."""

    n: int
    min_words: int = MIN_ITEM_WORDS
    grams: dict[int, set[tuple[str, ...]]] = field(default_factory=dict)

    def add(self, text: str) -> None:
        tokens = words(text)
        if len(tokens) < min(self.min_words, self.n):
            return
        size = min(self.n, len(tokens))
        self.grams.setdefault(size, set()).update(ngrams(tokens, size))

    def __len__(self) -> int:
        return sum(len(g) for g in self.grams.values())

    def contaminated(self, text: str) -> bool:
        tokens = words(text)
        for size, grams in self.grams.items():
            if any(tuple(tokens[i : i + size]) in grams for i in range(len(tokens) - size + 1)):
                return True
        return False


def build_eval_index(eval_texts: list[str], n: int = 13) -> EvalIndex:
    index = EvalIndex(n)
    for text in eval_texts:
        index.add(text)
    return index


def decontaminate(docs: list[Document], index: EvalIndex) -> tuple[list[Document], int]:
    """Keep the documents that share no n-gram with the evaluation sets; return them and the count removed."""
    if not index.grams:
        return docs, 0
    kept = [doc for doc in docs if not index.contaminated(doc.text)]
    return kept, len(docs) - len(kept)
