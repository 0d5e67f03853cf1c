"""Real tokenizer files from the wild (conftest.py fetches them), against `tokenizers` and `tiktoken`.

About 100 KB of real text (English prose, this package's own code, mixed scripts) must get identical
ids, decode back to itself, and take the same ids on tiktoken's fast path as on the pure-Python one.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import lmstack.tokenizer
from lmstack.tokenizer import Tokenizer
from lmstack.tokenizer.pretokenize import GPT4_PATTERN, TIKTOKEN_ENCODINGS

tokenizers = pytest.importorskip("tokenizers")
tiktoken = pytest.importorskip("tiktoken")
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe  # noqa: E402

pytestmark = pytest.mark.slow

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"
# Qwen's split pattern (one digit per piece), as its tokenizer ships it
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
QWEN_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


def english() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
    import pydoc_data.topics  # without ../shared: English prose from the installed Python's docs

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))[:60_000]


def code() -> str:
    folder = Path(lmstack.tokenizer.__file__).parent
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.py")))[:30_000]
    return text.replace("<|", "< |")  # no special-token strings: each library treats those its own way


def mixed_unicode(n_words: int = 2500) -> str:
    """Words drawn from many scripts, with digits, emoji, combining marks and odd whitespace."""
    ranges = [
        (0x41, 0x7A), (0xC0, 0x24F), (0x391, 0x3C9), (0x410, 0x44F), (0x5D0, 0x5EA), (0x627, 0x64A),
        (0x905, 0x939), (0xE01, 0xE2E), (0x3041, 0x3096), (0x30A1, 0x30FA), (0x4E00, 0x4FFF),
        (0xAC00, 0xAD00), (0x1F600, 0x1F64F), (0x660, 0x669), (0xFF10, 0xFF19), (0x30, 0x39),
    ]  # fmt: skip
    rng = random.Random(0)
    separators = [" ", " ", " ", "  ", "\n", "\t", "\r\n", "\u00a0", ", ", ". ", "!? ", " (", ") ", "\n\n   "]
    words = []
    for _ in range(n_words):
        lo, hi = rng.choice(ranges)
        word = "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8)))
        if rng.random() < 0.1:
            word += "\u0301"  # a combining accent
        words.append(word + rng.choice(separators))
    return "".join(words)


TEXTS = {"english": english(), "code": code(), "unicode": mixed_unicode()}


def assert_round_trip(tok: Tokenizer, ids_by_text: dict[str, list[int]]) -> None:
    for name, ids in ids_by_text.items():
        assert tok.decode(ids) == TEXTS[name], name


def pure(tok: Tokenizer) -> Tokenizer:
    tok.use_tiktoken = False
    return tok


def test_gpt2_original_encoder_json_and_vocab_bpe(real_file) -> None:
    encoder, vocab = real_file("gpt2/encoder.json"), real_file("gpt2/vocab.bpe")
    tok = Tokenizer.from_gpt2_files(encoder, vocab)
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(encoder), str(vocab)))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab), str(encoder))
    enc = tiktoken.Encoding(
        "gpt2", pat_str=TIKTOKEN_ENCODINGS["r50k_base"][0], mergeable_ranks=ranks, special_tokens={}
    )
    ours = {}
    for name, text in TEXTS.items():
        ours[name] = tok.encode(text)
        assert ours[name] == hf.encode(text).ids == enc.encode(text), name
    assert_round_trip(tok, ours)


@pytest.fixture(scope="module")
def llama3_json(real_file) -> tuple[Tokenizer, Path]:
    path = real_file("llama3/tokenizer.json")
    return Tokenizer.load(path), path


def test_llama3_tokenizer_json(llama3_json, tmp_path: Path) -> None:
    tok, path = llama3_json
    assert tok.vocab_size == 128256 and len(tok.merges) > 280_000 and len(tok.special_tokens) == 256
    hf = tokenizers.Tokenizer.from_file(str(path))
    ours = {}
    for name, text in TEXTS.items():
        text = f"<|begin_of_text|>{text}<|eot_id|>"
        expected = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, allowed_special="all") == expected, name
        assert tok.decode(expected) == hf.decode(expected, skip_special_tokens=False) == text
        ours[name] = tok.encode(TEXTS[name])
    assert_round_trip(tok, ours)
    # saved in our format and reloaded: the same ids; exported to tokenizers: the same ids
    reloaded = Tokenizer.load(tok.save(tmp_path))
    exported = tok.to_hf()
    for name, text in TEXTS.items():
        assert reloaded.encode(text) == ours[name] == exported.encode(text).ids, name


def test_llama3_rank_file_matches_tiktoken_and_the_tokenizer_json(real_file, llama3_json) -> None:
    """Meta ships the same vocabulary twice: a tiktoken rank file and a tokenizer.json."""
    path = real_file("llama3/tokenizer.model")
    tok = Tokenizer.from_tiktoken(path, pattern=GPT4_PATTERN, special_tokens={})
    enc = tiktoken.Encoding(
        "llama3", pat_str=GPT4_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(path)), special_tokens={}
    )
    slow = pure(Tokenizer.from_tiktoken(path, pattern=GPT4_PATTERN, special_tokens={}))
    exported = tok.to_tiktoken()
    for name, text in TEXTS.items():
        expected = enc.encode(text)
        assert tok.encode(text) == slow.encode(text) == expected == exported.encode(text), name
        assert llama3_json[0].encode(text) == expected, name
    assert tok._fast_encoding() is not None


def test_deepseek_v3_split_chain(real_file) -> None:
    path = real_file("deepseek-v3/tokenizer.json")
    real_file("deepseek-v3/tokenizer_config.json")
    tok = Tokenizer.load(path)
    assert tok.pre_tokenizer is not None and tok.bos_token == "<｜begin▁of▁sentence｜>"
    hf = tokenizers.Tokenizer.from_file(str(path))
    ours = {}
    for name, text in TEXTS.items():
        ours[name] = tok.encode(text)
        assert ours[name] == hf.encode(text, add_special_tokens=False).ids, name
    assert_round_trip(tok, ours)


@pytest.mark.parametrize(
    "key, specials",
    [
        ("whisper/gpt2.tiktoken", None),
        ("whisper/multilingual.tiktoken", {"<|endoftext|>": 50257}),
        ("qwen/qwen.tiktoken", QWEN_SPECIALS),
    ],
)
def test_tiktoken_rank_files(real_file, key: str, specials: dict[str, int] | None) -> None:
    path = real_file(key)
    pattern = QWEN_PATTERN if key.startswith("qwen") else None
    tok = Tokenizer.from_tiktoken(
        path, name=None if pattern else "r50k_base", pattern=pattern, special_tokens=specials
    )
    slow = pure(
        Tokenizer.from_tiktoken(
            path, name=None if pattern else "r50k_base", pattern=pattern, special_tokens=specials
        )
    )
    enc = tiktoken.Encoding(
        key,
        pat_str=tok.pattern,
        mergeable_ranks=load_tiktoken_bpe(str(path)),
        special_tokens=tok.special_tokens,
    )
    ours = {}
    for name, text in TEXTS.items():
        ours[name] = slow.encode(text)
        assert ours[name] == tok.encode(text) == enc.encode(text), name
        end = "<|endoftext|>"
        assert tok.encode(text + end, allowed_special="all") == enc.encode(text + end, allowed_special="all")
    assert_round_trip(slow, ours)
