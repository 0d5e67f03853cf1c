"""Encoding and decoding: round-trip properties, special tokens, the two encode paths, bad input."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.errors import InputError
from lmstack.tokenizer import Tokenizer, bpe
from lmstack.tokenizer.merge import merge_piece_heap, merge_piece_scan

CI = settings.get_profile("ci")  # tests/conftest.py: bounded, no deadline, derandomized

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Le cœur a ses raisons. Über den Wolken. "
    "Съешь же ещё этих мягких булок. 我能吞下玻璃而不伤身体。 私はガラスを食べられます。 🎉👩‍💻🇫🇷 "
    "def main(argv):\n    return 0\n\n\tx = [1, 2, 3]  # 1234567\n" * 20,
    "aaaaaaaaaaaaaaaa        \n\n\n    ....!!!!????" * 5,
]
if SHAKESPEARE.is_file():
    CORPUS.append(SHAKESPEARE.read_text(encoding="utf-8")[:100_000])
else:  # without ../shared, English prose of the same size from the installed Python's own docs
    import pydoc_data.topics

    CORPUS.append(
        "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))[:100_000]
    )

# strings that stress byte-level round trips: emoji (ZWJ, skin tone, flags), CJK, combining marks,
# control characters, odd whitespace, and specials' pieces
PIECES = [
    "👩‍👩‍👧",
    "👍🏽",
    "🇯🇵",
    "😀",
    "中文",
    "한국어",
    "e\u0301",
    "\u0301\u0301",
    "ﷺ",
    "𝔘𝔫𝔦",
    "\x00",
    "\x1b[0m",
    "\x7f",
    "\t",
    "\r\n",
    "\n\n\n",
    "   ",
    "\u2028",
    "\xa0",
    "\ufeff",
    "'s",
    "'LL",
    "123456",
    "½",
    "Ⅻ",
    "<|",
    "|>",
    "endoftext",
    "<|endoftext",
    "the",
    " the",
    "!!",
]
TEXTS = st.one_of(st.text(), st.lists(st.sampled_from(PIECES), max_size=20).map("".join))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS, 1200, special_tokens=SPECIALS)


def python_path(tok: Tokenizer) -> Tokenizer:
    slow = pickle.loads(pickle.dumps(tok))
    slow.use_tiktoken = False
    return slow


@CI
@given(text=TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    slow = python_path(tok)
    ids = slow.encode_ordinary(text)
    assert slow.decode(ids) == text
    assert slow.decode_bytes(ids) == text.encode("utf-8")


@CI
@given(text=TEXTS, with_special=st.booleans())
def test_tiktoken_path_equals_python_path(tok: Tokenizer, text: str, with_special: bool) -> None:
    pytest.importorskip("tiktoken")
    if with_special:
        text = f"{text}<|im_start|>{text}<|endoftext|>"
    slow = python_path(tok)
    assert tok.use_tiktoken and tok._fast_encoding() is not None
    assert tok.encode_ordinary(text) == slow.encode_ordinary(text)
    assert tok.encode(text, allowed_special="all") == slow.encode(text, allowed_special="all")


@CI
@given(text=TEXTS)
def test_heap_merge_equals_scan_merge(tok: Tokenizer, text: str) -> None:
    data = list(text.encode("utf-8"))
    assert merge_piece_heap(list(data), tok._ranks) == merge_piece_scan(list(data), tok._ranks)


def test_long_pieces_use_the_heap_and_round_trip(tok: Tokenizer) -> None:
    text = " " * 5000 + "x" * 3000 + "ab" * 2000
    slow = python_path(tok)
    assert slow.decode(slow.encode(text)) == text
    assert slow.encode(text) == tok.encode(text)


@CI
@given(text=TEXTS)
def test_streaming_decoder_emits_whole_characters(tok: Tokenizer, text: str) -> None:
    stream = tok.stream_decoder()
    chunks = [stream.push(i) for i in tok.encode_ordinary(text)]
    assert "".join(chunks) + stream.flush() == text
    assert all("\ufffd" not in chunk for chunk in chunks) or "\ufffd" in text


@CI
@given(ids=st.lists(st.integers(0, 1199), max_size=30))
def test_streaming_decoder_equals_decode_on_any_ids(tok: Tokenizer, ids: list[int]) -> None:
    stream = tok.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)


def test_emoji_split_across_tokens_streams_as_one_character() -> None:
    tok = Tokenizer([])  # bytes only: every emoji is four tokens
    stream = tok.stream_decoder()
    outputs = [stream.push(i) for i in tok.encode("😀!")]
    assert outputs == ["", "", "", "😀", "!"]
    assert stream.flush() == ""
    assert tok.decode(tok.encode("😀")[:2]) == "\ufffd"  # a cut character becomes U+FFFD
    assert stream.push(0xF0) == "" and stream.flush() == "\ufffd"


@pytest.mark.parametrize("method", ["encode", "encode_ordinary"])
def test_lone_surrogate_raises_with_index(tok: Tokenizer, method: str) -> None:
    with pytest.raises(ValueError, match="lone surrogate U\\+D83D at index 3"):
        getattr(tok, method)("abc\ud83d")


def test_special_tokens(tok: Tokenizer) -> None:
    text = "<|im_start|>user\nhi<|im_end|><|endoftext|>"
    with pytest.raises(InputError, match=r"special token '<\|im_start\|>' at index 0 .*allowed_special"):
        tok.encode(text)
    with pytest.raises(InputError, match=r"'<\|im_end\|>' at index 19"):
        tok.encode(text, allowed_special={"<|im_start|>", "<|endoftext|>"})
    ids = tok.encode(text, allowed_special="all")
    assert ids[0] == tok.special_tokens["<|im_start|>"] and ids[-2:] == [1199, 1197]
    assert tok.decode(ids) == text
    ordinary = tok.encode_ordinary(text)  # the strings are plain text: no special id appears
    assert not set(ordinary) & set(tok.special_tokens.values()) and tok.decode(ordinary) == text
    with pytest.raises(InputError, match="unknown tokens"):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_vocabulary_layout_and_properties(tok: Tokenizer) -> None:
    assert tok.vocab_size == len(tok) == 1200
    assert tok.special_tokens == {"<|endoftext|>": 1197, "<|im_start|>": 1198, "<|im_end|>": 1199}
    assert [tok.id_to_bytes(i) for i in (0, 65, 255)] == [b"\x00", b"A", b"\xff"]
    left, right, new_id = tok.merges[0]
    assert new_id == 256 and tok.id_to_bytes(256) == tok.id_to_bytes(left) + tok.id_to_bytes(right)
    assert tok.id_to_bytes(1197) == b"<|endoftext|>"
    assert tok.eos_id == 1197 and tok.bos_id is None
    assert tok.chat_template == "" and tok.pattern_name == "gpt4"


def test_eos_and_bos_rules() -> None:
    assert Tokenizer([]).eos_id is None
    # no guessing: a special token is the EOS only when declared or named <|endoftext|>
    assert Tokenizer([], special_tokens=["<|im_start|>", "<|im_end|>"]).eos_id is None
    assert Tokenizer([], special_tokens=["<pad>", "<|endoftext|>"]).eos_id == 257
    tok = Tokenizer.train(
        ["abc abc"],
        260,
        special_tokens=["<pad>", "<|begin_of_text|>"],
        bos_token="<|begin_of_text|>",
        eos_token="<pad>",
    )
    assert tok.bos_id == 259 and tok.eos_id == 258
    with pytest.raises(InputError, match="bos_token '<s>' is not one of the special tokens"):
        Tokenizer([], special_tokens=["<pad>"], bos_token="<s>")


def test_content_hash_identifies_the_ids(tok: Tokenizer) -> None:
    same = Tokenizer(tok.merges, special_tokens=tok.special_tokens)
    assert same.content_hash == tok.content_hash and len(tok.content_hash) == 64
    same.chat_template = "{{ messages }}"  # not part of the identity
    assert same.content_hash == tok.content_hash
    assert Tokenizer(tok.merges[:-1], special_tokens=SPECIALS).content_hash != tok.content_hash
    assert (
        Tokenizer(tok.merges, pattern="gpt2", special_tokens=tok.special_tokens).content_hash
        != tok.content_hash
    )
    with pytest.raises(InputError, match="chat_template must be a string"):
        same.chat_template = None


def test_decode_errors(tok: Tokenizer) -> None:
    for bad in (1200, -1, 10**9):
        with pytest.raises(InputError, match=f"token id {bad} is not in this tokenizer"):
            tok.decode([5, bad])
    with pytest.raises(InputError, match="text must be a str"):
        tok.encode(b"bytes")


def test_cache_is_bounded(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bpe, "CACHE_MAX_PIECES", 10)
    slow = python_path(tok)
    text = " ".join(f"w{i}" for i in range(200))
    assert slow.decode(slow.encode(text)) == text and len(slow._cache) <= 10


def test_bad_constructor_state() -> None:
    with pytest.raises(InputError, match="uses an id that no byte, vocabulary token or merge defines"):
        Tokenizer([(97, 300)])
    with pytest.raises(InputError, match="same pair appears twice"):
        Tokenizer([(97, 98), (97, 98)])
    with pytest.raises(InputError, match="already used by another token"):
        Tokenizer([], special_tokens={"<s>": 65})


def test_custom_pattern_stays_on_the_python_path() -> None:
    # \X (grapheme clusters) is valid for `regex` but refused by tiktoken's engine
    tok = Tokenizer.train(["héllo wörld, héllo again"], 258, pattern=r"\X")
    assert tok._fast_encoding() is None
    assert tok.decode(tok.encode("héllo")) == "héllo"
