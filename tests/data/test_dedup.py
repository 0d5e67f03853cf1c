import os
import subprocess
import sys

import numpy as np
import pytest

from lmstack.data.dedup import (
    DedupConfig,
    candidate_probability,
    estimated_jaccard,
    minhash_signature,
    normalise,
    permutations,
    remove_exact_duplicates,
    remove_near_duplicates,
    shingle_hashes,
    shingles,
)
from lmstack.data.extract import Document


def signature(text, config=None):
    config = config or DedupConfig()
    a, b = permutations(config.num_perm, config.seed)
    return minhash_signature(shingle_hashes(shingles(text, config.shingle_size)), a, b)


def edit_words(text, every):
    words = text.split(" ")
    return " ".join("CHANGED" if i % every == 0 else w for i, w in enumerate(words))


def test_exact_duplicates_ignore_case_and_whitespace():
    docs = [
        Document("Hello  World\n", "s", "a"),
        Document("other", "s", "b"),
        Document("hello world", "s", "c"),
    ]
    kept, removed = remove_exact_duplicates(docs)
    assert [d.origin for d in kept] == ["a", "b"] and removed == 1
    assert normalise(" A\tB ") == "a b"


def test_planted_near_duplicate_found_and_different_doc_kept(make_prose):
    base = make_prose(1, 400)
    near = edit_words(base, 60)  # ~7 of 400 words changed: Jaccard of 5-shingles ≈ 0.85
    different = make_prose(2, 400)  # same vocabulary, different text
    true_j = len(shingles(base, 5) & shingles(near, 5)) / len(shingles(base, 5) | shingles(near, 5))
    assert 0.8 < true_j < 0.95
    docs = [Document(base, "s", "base"), Document(different, "s", "different"), Document(near, "s", "near")]
    kept, removed = remove_near_duplicates(docs, DedupConfig())
    assert [d.origin for d in kept] == ["base", "different"] and removed == 1


def test_below_threshold_edit_is_kept(make_prose):
    base = make_prose(3, 400)
    far = edit_words(base, 4)  # a quarter of the words changed: Jaccard well below 0.8
    kept, removed = remove_near_duplicates([Document(base, "s", "a"), Document(far, "s", "b")], DedupConfig())
    assert removed == 0


@pytest.mark.parametrize("every", [3, 6, 15, 40])
def test_minhash_estimates_jaccard(make_prose, every):
    a_text = make_prose(4, 500)
    b_text = edit_words(a_text, every)
    sa, sb = shingles(a_text, 5), shingles(b_text, 5)
    true_j = len(sa & sb) / len(sa | sb)
    config = DedupConfig(num_perm=512, bands=64)
    est = estimated_jaccard(signature(a_text, config), signature(b_text, config))
    assert abs(est - true_j) < 0.08  # std of the estimate is sqrt(J(1-J)/512) <= 0.022


def test_lsh_candidate_probability_s_curve():
    # the defaults: 32 bands of 4 rows
    assert candidate_probability(0.8, 32, 4) > 1 - 1e-6
    assert candidate_probability(0.2, 32, 4) < 0.06
    assert candidate_probability(1.0, 32, 4) == 1.0
    # fewer, longer bands move the curve right: 16 bands of 8 rows miss 5% of pairs at 0.8
    assert candidate_probability(0.8, 16, 8) == pytest.approx(0.947, abs=1e-3)


def test_signature_is_deterministic_across_processes(make_prose):
    """No salted hash(): a fresh interpreter with another hash seed computes the same signature."""
    text = make_prose(5, 100)
    code = (
        "import sys; from lmstack.data.dedup import *; c = DedupConfig(); a, b = permutations(c.num_perm, c.seed);"
        "print(minhash_signature(shingle_hashes(shingles(sys.stdin.read(), 5)), a, b).tolist())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], input=text, capture_output=True, text=True, env=env, check=True
    )
    assert eval(out.stdout) == signature(text).tolist()


def test_empty_and_tiny_documents():
    config = DedupConfig()
    assert np.all(signature("") == np.iinfo(np.uint32).max)
    assert shingles("two words", 5) == {"two words"}
    docs = [Document("", "s", "a"), Document("two words", "s", "b"), Document("other words", "s", "c")]
    kept, _ = remove_near_duplicates(docs, config)
    assert [d.origin for d in kept] == ["a", "b", "c"]
