import pytest

from lmstack.data.extract import Document
from lmstack.data.mix import mix_documents, text_bytes
from lmstack.errors import InputError


def corpus(make_prose, sizes):
    docs = []
    for source, n in sizes.items():
        docs += [Document(make_prose(hash_free(source, i), 60), source, f"{source}/{i}") for i in range(n)]
    return docs


def hash_free(source, i):
    return sum(map(ord, source)) * 1000 + i


def shares(docs):
    total = sum(text_bytes(d) for d in docs)
    out = {}
    for d in docs:
        out[d.source] = out.get(d.source, 0) + text_bytes(d) / total
    return out


def test_requested_proportions_hold(make_prose):
    docs = corpus(make_prose, {"books": 300, "web": 100, "code": 100})
    weights = {"books": 0.2, "web": 0.5, "code": 0.3}
    mixed, report = mix_documents(docs, weights, seed=1)
    achieved = shares(mixed)
    # each source lands within half a document (~200 bytes) of its target; with ~100 docs per
    # source that is well within one percentage point
    for source, weight in weights.items():
        assert achieved[source] == pytest.approx(weight, abs=0.01)
        assert report.achieved[source] == pytest.approx(achieved[source])
    assert report.requested == pytest.approx(weights)
    # downsampling only: the limiting source (web) is kept whole, nothing repeated
    assert report.docs_after["web"] == 100
    assert len({(d.source, d.origin) for d in mixed}) == len(mixed)


def test_repeats_let_a_small_source_grow(make_prose):
    docs = corpus(make_prose, {"big": 200, "small": 20})
    mixed, report = mix_documents(docs, {"big": 1, "small": 1}, max_repeats=4)
    assert shares(mixed)["small"] == pytest.approx(0.5, abs=0.02)
    assert report.docs_after["small"] == 80  # four whole passes
    assert report.docs_after["big"] < 200


def test_natural_proportions_without_weights(make_prose):
    docs = corpus(make_prose, {"a": 5, "b": 15})
    mixed, report = mix_documents(docs, None)
    assert mixed == docs and report.requested == {}
    assert sum(report.achieved.values()) == pytest.approx(1.0)


def test_mixing_is_deterministic_and_seeded(make_prose):
    docs = corpus(make_prose, {"a": 100, "b": 100})
    one = mix_documents(docs, {"a": 0.8, "b": 0.2}, seed=0)[0]
    assert one == mix_documents(docs, {"a": 0.8, "b": 0.2}, seed=0)[0]
    assert one != mix_documents(docs, {"a": 0.8, "b": 0.2}, seed=1)[0]


def test_zero_weight_drops_a_source(make_prose):
    docs = corpus(make_prose, {"a": 10, "b": 10})
    mixed, _ = mix_documents(docs, {"a": 1, "b": 0})
    assert {d.source for d in mixed} == {"a"} and len(mixed) == 10


@pytest.mark.parametrize(
    "weights, match",
    [
        ({"a": 1}, "no weight given"),
        ({"a": 1, "b": 1, "c": 1}, "unknown"),
        ({"a": -1, "b": 1}, "≥ 0"),
        ({"a": 0, "b": 0}, "all weights"),
    ],
)
def test_bad_weights(make_prose, weights, match):
    with pytest.raises(InputError, match=match):
        mix_documents(corpus(make_prose, {"a": 2, "b": 2}), weights)
