"""Stage 3 — de-duplication: exact (normalised hash) and near-duplicate (MinHash + LSH banding).

Exact: documents whose normalised text (Unicode NFKC, lower case, whitespace collapsed) has the same
SHA-256 are copies; the first in pipeline order is kept.

Near: the Jaccard similarity J(A, B) = |A ∩ B| / |A ∪ B| of two documents' sets of word n-grams
("shingles") is estimated with MinHash (Broder, 1997): under a random hash function h,
P[min h(A) = min h(B)] = J(A, B), so the fraction of equal entries of two `num_perm`-long signatures
estimates J. Comparing every pair is quadratic, so LSH banding cuts each signature into `bands` bands of
`rows = num_perm / bands` rows and only documents equal on a whole band become candidates; a pair with
similarity s becomes a candidate with probability 1 - (1 - s^rows)^bands, an S-curve whose steepest
point is near (1 / bands)^(1 / rows). Candidates are then confirmed by their estimated Jaccard
≥ `threshold`. With the defaults (128 permutations, 32 bands of 4 rows) the S-curve sits near 0.42, so
a pair at the 0.8 threshold becomes a candidate with probability 1 − 5·10⁻⁸; banding then only saves
time (pairs below 0.2 are rarely even compared) and the threshold check decides.

Every hash is deterministic: SHA-256/BLAKE2b of bytes and a seeded NumPy PCG64 for the permutation
coefficients — never Python's salted `hash()` — so the same corpus drops the same documents anywhere.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from lmstack.data.extract import Document

WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    near: bool = True
    shingle_size: int = 5  # words per shingle
    num_perm: int = 128  # MinHash signature length
    bands: int = 32  # LSH bands of num_perm / bands rows; num_perm must be a multiple of it
    threshold: float = 0.8  # estimated Jaccard at or above which a candidate is a duplicate
    seed: int = 0


# ---------------------------------------------------------------- exact


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def content_key(text: str) -> str:
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


def remove_exact_duplicates(docs: list[Document]) -> tuple[list[Document], int]:
    seen: set[str] = set()
    kept = []
    for doc in docs:
        key = content_key(doc.text)
        if key not in seen:
            seen.add(key)
            kept.append(doc)
    return kept, len(docs) - len(kept)


# ---------------------------------------------------------------- MinHash


def shingles(text: str, size: int) -> set[str]:
    """Word n-grams of the normalised text; a text shorter than `size` words is one shingle."""
    words = WORD.findall(normalise(text))
    if len(words) <= size:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def shingle_hashes(items: set[str]) -> np.ndarray:
    """32-bit BLAKE2b of each shingle, sorted so the result does not depend on set iteration order."""
    values = sorted(
        int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little") for s in items
    )
    return np.asarray(values, dtype=np.uint64)


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (a, b) of `num_perm` multiply-add-shift hash functions h(x) = ((a·x + b) mod 2^64) >> 32,
    a 2-universal family for 32-bit keys (Dietzfelbinger, 1996); `a` is odd."""
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2)
    return a, b


def minhash_signature(hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(num_perm,) uint32 minimum of each hash function over the shingle hashes."""
    if hashes.size == 0:
        return np.full(a.shape, np.iinfo(np.uint32).max, dtype=np.uint32)
    # (P, 1) * (1, S) -> (P, S); uint64 arithmetic wraps mod 2^64, which is the family's definition.
    mixed = (a[:, None] * hashes[None, :] + b[:, None]) >> np.uint64(32)
    return mixed.min(axis=1).astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """Chance that two documents of Jaccard `similarity` share at least one LSH band."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def remove_near_duplicates(docs: list[Document], config: DedupConfig) -> tuple[list[Document], int]:
    """Drop each document whose estimated Jaccard with an already kept one reaches the threshold."""
    rows = config.num_perm // config.bands
    a, b = permutations(config.num_perm, config.seed)
    buckets: dict[tuple[int, bytes], list[int]] = {}
    signatures: list[np.ndarray] = []
    kept: list[Document] = []
    for doc in docs:
        sig = minhash_signature(shingle_hashes(shingles(doc.text, config.shingle_size)), a, b)
        keys = [(band, sig[band * rows : (band + 1) * rows].tobytes()) for band in range(config.bands)]
        candidates = {i for key in keys for i in buckets.get(key, ())}
        if any(estimated_jaccard(sig, signatures[i]) >= config.threshold for i in sorted(candidates)):
            continue
        index = len(kept)
        kept.append(doc)
        signatures.append(sig)
        for key in keys:
            buckets.setdefault(key, []).append(index)
    return kept, len(docs) - len(kept)
