import pytest

from lmstack.data.extract import Document
from lmstack.data.quality import (
    QualityConfig,
    digit_ratio,
    duplicate_line_fraction,
    filter_quality,
    non_text_ratio,
    symbol_ratio,
)


def test_statistics_match_hand_counts():
    assert symbol_ratio("ab #$") == pytest.approx(2 / 4)
    assert digit_ratio("a1 b2 c") == pytest.approx(2 / 5)
    # lines "aaaa", "bb", "aaaa": the second "aaaa" repeats -> 4 of 10 line characters
    assert duplicate_line_fraction("aaaa\nbb\n\naaaa\n") == pytest.approx(4 / 10)
    assert non_text_ratio("ab\x00\ufffd\n\t") == pytest.approx(2 / 6)
    assert symbol_ratio("") == digit_ratio("") == duplicate_line_fraction("") == non_text_ratio("") == 0


def test_each_filter_removes_its_planted_document(make_prose):
    good = [Document(make_prose(i), "s", f"good{i}") for i in range(5)]
    planted = {
        "too_short": "Too short.",
        "non_text": make_prose(100) + "\x00\x01\x02\ufffd" * 20,
        "symbol_ratio": make_prose(101, 20) + "\n" + "#$%&*@!{}[]<>|~^" * 30,
        "digit_ratio": make_prose(102, 20) + "\n" + " ".join(str(1000 + i) for i in range(200)),
        "duplicate_lines": "\n".join(
            ["Click here to subscribe to our newsletter today."] * 12 + [make_prose(103, 20)]
        ),
    }
    docs = good[:2] + [Document(t, "s", name) for name, t in planted.items()] + good[2:]
    kept, removed = filter_quality(docs, QualityConfig())
    assert kept == good
    assert removed == {name: 1 for name in planted}


def test_thresholds_are_configurable(make_prose):
    doc = Document(make_prose(7, 200), "s", "d")
    assert filter_quality([doc], QualityConfig())[0] == [doc]
    kept, removed = filter_quality([doc], QualityConfig(min_chars=10**6))
    assert kept == [] and removed["too_short"] == 1


def test_shakespeare_like_speaker_lines_are_not_duplicate_boilerplate():
    speech = "\n\n".join(
        f"ROMEO:\nLine {w} of a long speech that goes on for a while.\n\nJULIET:\nAn answer about {w} and more."
        for w in ("love", "night", "stars", "sorrow", "morning", "parting")
    )
    assert duplicate_line_fraction(speech) < QualityConfig().max_duplicate_line_fraction
