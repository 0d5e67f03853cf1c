"""Normalizers, pre-tokenizers and added tokens of tokenizer.json files, each against `tokenizers`.

Each case builds a small byte-level BPE with the `tokenizers` library itself (its trainer, its JSON), so
the file is the reference's own; lmstack imports it and must give the same ids and decode back.
"""

from __future__ import annotations

import json

import pytest

from lmstack.errors import InputError
from lmstack.tokenizer import Tokenizer
from lmstack.tokenizer.hf_format import from_hf_json

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, normalizers, pre_tokenizers  # noqa: E402
from tokenizers.models import BPE  # noqa: E402
from tokenizers.trainers import BpeTrainer  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, and we've paid $1,234.56 (taxes incl.)!",
    "def f(x):\n    return x**2  # squares\r\n\tprint(f(12345), 'done')\n\n\n",
    "Ünïcödé: café, naïve, Straße, ΣΟΦΙΑ σοφία, 日本語のテキスト, emoji 😀👍🏽, ﬁne ① ２３ Ⅻ ٣٤٥",
    "   leading spaces, trailing   \n, multiple    gaps; semi;colons -- dashes — em, «quotes» ‘x’",
] * 3
TEXTS = [
    *CORPUS[:4],
    "HELLO World, HeLLo again: 1234567890 and ৩৪৫ digits.",
    " x  y   z\n\n  \t end",
    "ΣΑΣ ΑΣ. Ǆ ǅ ǆ İstanbul",
    "a",
    "",
]


def build(pre_tokenizer, normalizer=None, vocab_size: int = 400) -> tokenizers.Tokenizer:
    hf = tokenizers.Tokenizer(BPE())
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    if normalizer is not None:
        hf.normalizer = normalizer
    trainer = BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator(CORPUS, trainer)
    return hf


def assert_same(hf: tokenizers.Tokenizer, texts=TEXTS, allowed="all") -> Tokenizer:
    ours = from_hf_json(Tokenizer, json.loads(hf.to_str()))
    for text in texts:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, allowed_special=allowed) == expected, text
        assert ours.decode(expected) == hf.decode(expected, skip_special_tokens=False), text
    return ours


def byte_level(use_regex: bool = False, add_prefix_space: bool = False):
    return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=use_regex)


@pytest.mark.parametrize("use_regex", [True, False])
@pytest.mark.parametrize("add_prefix_space", [True, False])
def test_byte_level(use_regex: bool, add_prefix_space: bool) -> None:
    assert_same(build(byte_level(use_regex, add_prefix_space)))


BEHAVIOURS = ["isolated", "removed", "merged_with_previous", "merged_with_next", "contiguous"]


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize(
    "pattern", [tokenizers.Regex(r"\p{N}|\s+|[.,;!]"), tokenizers.Regex(r"[aeiou]+"), " "], ids=str
)
def test_split(behaviour: str, invert: bool, pattern) -> None:
    split = pre_tokenizers.Split(pattern, behaviour, invert=invert)
    assert_same(build(pre_tokenizers.Sequence([split, byte_level()])))


@pytest.mark.parametrize("individual", [True, False])
@pytest.mark.parametrize("use_regex", [True, False])
def test_digits_then_byte_level(individual: bool, use_regex: bool) -> None:
    # SmolLM / StarCoder: Sequence[Digits(individual_digits=true), ByteLevel]
    steps = [pre_tokenizers.Digits(individual_digits=individual), byte_level(use_regex)]
    assert_same(build(pre_tokenizers.Sequence(steps)))


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_punctuation(behaviour: str) -> None:
    assert_same(build(pre_tokenizers.Sequence([pre_tokenizers.Punctuation(behaviour), byte_level()])))


@pytest.mark.parametrize("step", [pre_tokenizers.Whitespace(), pre_tokenizers.WhitespaceSplit()], ids=str)
@pytest.mark.parametrize("add_prefix_space", [True, False])
def test_whitespace(step, add_prefix_space: bool) -> None:
    assert_same(build(pre_tokenizers.Sequence([step, byte_level(True, add_prefix_space)])))


def test_nested_sequence_saves_and_reloads(tmp_path) -> None:
    inner = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.Digits(True)])
    outer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), inner, byte_level(True)])
    ours = assert_same(build(outer))
    reloaded = Tokenizer.load(ours.save(tmp_path))
    assert reloaded.pre_tokenizer == ours.pre_tokenizer and reloaded.content_hash == ours.content_hash
    for text in TEXTS:
        assert reloaded.encode(text) == ours.encode(text)


@pytest.mark.parametrize(
    "normalizer",
    [
        normalizers.NFC(),
        normalizers.NFKC(),
        normalizers.Lowercase(),
        normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]),
    ],
    ids=str,
)
def test_normalizers(normalizer, tmp_path) -> None:
    ours = assert_same(build(byte_level(True), normalizer))
    loaded = Tokenizer.load(ours.save(tmp_path))  # our file keeps the chain
    assert loaded.encode(TEXTS[2]) == ours.encode(TEXTS[2])


def test_plain_forms_keep_the_pattern() -> None:
    regex = r"\p{L}+|\p{N}{1,3}|\s+|[^\s\p{L}\p{N}]+"
    split = pre_tokenizers.Split(tokenizers.Regex(regex), "isolated")
    ours = assert_same(build(pre_tokenizers.Sequence([split, byte_level()])))
    assert ours.pre_tokenizer is None and ours.pattern == regex
    ours = assert_same(build(byte_level(True)))
    assert ours.pre_tokenizer is None and ours.pattern_name == "gpt2"


@pytest.mark.parametrize(
    "setter, name",
    [
        (lambda hf: setattr(hf, "pre_tokenizer", pre_tokenizers.BertPreTokenizer()), "BertPreTokenizer"),
        (
            lambda hf: setattr(
                hf, "pre_tokenizer", pre_tokenizers.Sequence([pre_tokenizers.CharDelimiterSplit("x")])
            ),
            "ByteLevel",
        ),
        (lambda hf: setattr(hf, "normalizer", normalizers.StripAccents()), "StripAccents"),
        (lambda hf: setattr(hf, "normalizer", normalizers.NFD()), "NFD"),
    ],
)
def test_unsupported_components_are_named(setter, name: str) -> None:
    hf = build(byte_level(True))
    setter(hf)
    with pytest.raises(InputError, match=name):
        from_hf_json(Tokenizer, json.loads(hf.to_str()))


# ---------------------------------------------------------------------------------------------------
# added tokens


def test_added_tokens_special_and_not() -> None:
    hf = build(byte_level(True))
    hf.add_special_tokens(["<|end|>"])
    hf.add_tokens(
        [tokenizers.AddedToken("<tool>", normalized=False), tokenizers.AddedToken("xyz", normalized=False)]
    )
    text = "call <tool> with xyz and xyzzy<|end|> then<tool><|end|>"
    ours = assert_same(hf, [*TEXTS, text])
    assert ours.special_tokens == {"<|end|>": hf.token_to_id("<|end|>")}
    assert min(ours.special_tokens.values()) >= 400  # above the BPE range
    with pytest.raises(InputError, match="special token"):
        ours.encode(text)  # specials need allowed_special; non-special added tokens never do
    assert ours.encode_ordinary("a <tool> b") == hf.encode("a <tool> b", add_special_tokens=False).ids


def test_normalized_added_tokens_match_after_normalization(tmp_path) -> None:
    hf = build(byte_level(True), normalizers.Lowercase())
    hf.add_tokens(
        [tokenizers.AddedToken("Hello", normalized=True), tokenizers.AddedToken("RAW", normalized=False)]
    )
    text = "HELLO hello Hello RAW raw Raw"
    ours = assert_same(hf, [*TEXTS, text])
    assert ours.normalized_tokens == ("Hello",)
    reloaded = Tokenizer.load(ours.save(tmp_path))
    assert reloaded.encode(text) == ours.encode(text)
    assert reloaded.to_hf().encode(text).ids == ours.encode(text)


def test_export_of_a_chain_round_trips_through_tokenizers() -> None:
    steps = [pre_tokenizers.Digits(individual_digits=True), byte_level(True)]
    ours = assert_same(build(pre_tokenizers.Sequence(steps), normalizers.NFKC()))
    exported = ours.to_hf()
    for text in TEXTS:
        assert exported.encode(text).ids == ours.encode(text)
