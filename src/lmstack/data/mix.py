"""Stage 5 — controlled mixing: per-source weights set the final share of each source.

Weights are normalised to requested proportions p_s (share of UTF-8 text bytes). Without repetition a
source cannot grow, so the largest mixture that honours every share has total size
T = min_s size_s · max_repeats / p_s; source s then contributes p_s · T bytes: whole copies of itself
while p_s · T ≥ its size (only when `max_repeats` > 1, as GPT-3 repeated its best sources), then a
seeded, deterministic sample of its documents. A document is taken when it brings the running total
closer to the target, so each source lands within half a document of its target; the achieved
proportions are reported next to the requested ones.

Without weights the sources keep their natural proportions and nothing is dropped.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from lmstack.data.extract import Document
from lmstack.errors import InputError


def text_bytes(doc: Document) -> int:
    return len(doc.text.encode("utf-8"))


def doc_order_key(doc: Document, seed: int, copy: int = 0) -> bytes:
    """Deterministic pseudo-random rank of a document (same on every machine and Python)."""
    return hashlib.sha256(f"{seed}\0{copy}\0{doc.source}\0{doc.origin}\0{doc.text}".encode()).digest()


@dataclass(frozen=True)
class MixReport:
    requested: dict[str, float]  # source -> share asked for (empty: natural proportions)
    achieved: dict[str, float]  # source -> share of bytes in the mixture
    bytes_before: dict[str, int]
    bytes_after: dict[str, int]
    docs_before: dict[str, int]
    docs_after: dict[str, int]  # counts repeated copies

    def to_dict(self) -> dict[str, dict]:
        return {
            "requested": self.requested,
            "achieved": self.achieved,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "documents_before": self.docs_before,
            "documents_after": self.docs_after,
        }


def source_bytes(docs: list[Document]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for doc in docs:
        sizes[doc.source] = sizes.get(doc.source, 0) + text_bytes(doc)
    return dict(sorted(sizes.items()))


def proportions(sizes: dict[str, int]) -> dict[str, float]:
    total = sum(sizes.values())
    return {s: (n / total if total else 0.0) for s, n in sizes.items()}


def check_weights(weights: dict[str, float], sources: list[str]) -> dict[str, float]:
    """Validate user weights against the sources present and normalise them to proportions."""
    unknown = sorted(set(weights) - set(sources))
    if unknown:
        raise InputError(f"weights name unknown sources {unknown}; the sources are {sorted(sources)}")
    missing = sorted(set(sources) - set(weights))
    if missing:
        raise InputError(f"no weight given for sources {missing} — give every source a weight (0 drops one)")
    if any(not math.isfinite(w) or w < 0 for w in weights.values()):
        raise InputError(f"weights must be finite and ≥ 0, got {weights}")
    total = sum(weights.values())
    if total <= 0:
        raise InputError("all weights are 0 — give at least one source a positive weight")
    return {s: weights[s] / total for s in sorted(sources)}


def mix_documents(
    docs: list[Document], weights: dict[str, float] | None, *, max_repeats: int = 1, seed: int = 0
) -> tuple[list[Document], MixReport]:
    """Resample `docs` so that each source's byte share matches its weight. Order of the result:
    each source's documents in its sample order, sources sorted; shuffle later if needed."""
    if max_repeats < 1:
        raise InputError(f"max_repeats must be ≥ 1, got {max_repeats}")
    sizes = source_bytes(docs)
    by_source: dict[str, list[Document]] = {s: [] for s in sizes}
    for doc in docs:
        by_source[doc.source].append(doc)
    docs_before = {s: len(d) for s, d in by_source.items()}
    if not weights:
        return docs, MixReport({}, proportions(sizes), sizes, sizes, docs_before, docs_before)

    requested = check_weights(weights, list(sizes))
    for s, p in requested.items():
        if p > 0 and sizes[s] == 0:
            raise InputError(f"source {s!r} has weight {weights[s]} but no text left after curation")
    total = min(sizes[s] * max_repeats / p for s, p in requested.items() if p > 0)
    mixed: list[Document] = []
    for s in sizes:
        mixed += sample_source(by_source[s], requested[s] * total, seed)
    after = source_bytes(mixed)
    after = {s: after.get(s, 0) for s in sizes}
    docs_after = {s: sum(1 for d in mixed if d.source == s) for s in sizes}
    return mixed, MixReport(requested, proportions(after), sizes, after, docs_before, docs_after)


def sample_source(docs: list[Document], target_bytes: float, seed: int) -> list[Document]:
    """Whole passes over `docs` while they fit in the target, then a seeded sample for the rest."""
    size = sum(text_bytes(d) for d in docs)
    if size == 0 or target_bytes <= 0:
        return []
    # tolerance 1e-9: the limiting source's target is exactly its size up to float rounding
    copies = int(target_bytes / size + 1e-9)
    out = [d for _ in range(copies) for d in docs]
    remaining = target_bytes - copies * size
    taken = 0
    for doc in sorted(docs, key=lambda d: doc_order_key(d, seed, copies)):
        n = text_bytes(doc)
        if taken + n / 2 <= remaining:  # taking it moves the total closer to the target
            out.append(doc)
            taken += n
    return out
