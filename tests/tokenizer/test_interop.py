"""Interoperability: our file format, Hugging Face `tokenizers`, tiktoken, and `transformers`.

The references are built here from scratch with the `tokenizers` library (no downloads): a GPT-2-style,
a Llama-3-style and a Qwen2-style byte-level tokenizer.json, plus SentencePiece-style ones to refuse.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmstack.errors import InputError
from lmstack.tokenizer import GPT4_PATTERN, Tokenizer

tokenizers = pytest.importorskip("tokenizers")
tiktoken = pytest.importorskip("tiktoken")
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

TRAIN = [
    "The quick brown fox jumps over the lazy dog. Le cœur a ses raisons que la raison ne connaît point. "
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. Съешь же ещё этих мягких французских булок. "
    "我能吞下玻璃而不伤身体。 私はガラスを食べられます。 나는 유리를 먹을 수 있어요. Ἐν ἀρχῇ ἦν ὁ λόγος. "
    "🎉🎉 👩‍💻 🇫🇷 👍🏽 1234567890\n"
    "def tokenize(text: str) -> list[int]:\n    ids = []\n    for ch in text:\n        ids.append(ord(ch))\n"
    "    return ids  # it's done\n\n\tif x == 10_000:\n\t\tprint(f'{x!r}')\r\n" * 12
]
if SHAKESPEARE.is_file():
    TRAIN.append(SHAKESPEARE.read_text(encoding="utf-8")[:60_000])

# held out: none of these sentences is in the training text
HELD_OUT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "Wie spät ist es? Сколько стоит билет? 東京タワーはどこですか？ 北京欢迎你！ 안녕하세요 세계 "
    "Καλημέρα κόσμε! مرحبا بالعالم नमस्ते café naïve e\u0301 ﬁn\n"
    "I'M SURE they'll say it's fine; we've 3,141,592 reasons.<|im_end|>\n"
    "```python\nclass Stack:\n    def __init__(self) -> None:\n        self.items: list[int] = []\n\n"
    "    def push(self, x):\t# O(1)\r\n        self.items.append(x)\n```\n"
    "Emoji: 🧑🏾‍🚀 🏳️‍🌈 🇧🇷 😀😃😄 ✔︎ ★   \n\n\n   trailing   "
    "<|endoftext|>next document \x00\x1b[31mred\x1b[0m\u2028end"
)


@pytest.fixture(scope="module", params=["gpt4", "gpt2"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return Tokenizer.train(TRAIN, 1500, pattern=request.param, special_tokens=SPECIALS)


def test_three_encoders_agree_on_held_out_text(tok: Tokenizer) -> None:
    fast = tok.encode(HELD_OUT, allowed_special="all")
    tok.use_tiktoken = False
    try:
        pure = tok.encode(HELD_OUT, allowed_special="all")
    finally:
        tok.use_tiktoken = True
    hf_ids = tok.to_hf().encode(HELD_OUT).ids
    tt_ids = tok.to_tiktoken().encode(HELD_OUT, allowed_special="all")
    assert pure == fast == hf_ids == tt_ids
    assert len(pure) < len(HELD_OUT.encode())  # merges were used, not just bytes
    assert tok.to_hf().decode(pure, skip_special_tokens=False) == HELD_OUT == tok.decode(pure)


def test_save_load_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        tok.save(tmp_path)
    finally:
        tok.chat_template = ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "lmstack_tokenizer.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    loaded = Tokenizer.load(tmp_path)
    assert loaded.content_hash == tok.content_hash and loaded.merges == tok.merges
    assert loaded.chat_template.startswith("{% for m") and loaded.special_tokens == tok.special_tokens
    assert loaded.encode(HELD_OUT, allowed_special="all") == tok.encode(HELD_OUT, allowed_special="all")
    saved = json.loads((tmp_path / "lmstack_tokenizer.json").read_text())
    assert saved["format"] == "lmstack_tokenizer" and saved["version"] == 1
    # without our file, the same ids come back through the Hugging Face import
    (tmp_path / "lmstack_tokenizer.json").unlink()
    imported = Tokenizer.load(tmp_path)
    assert imported.content_hash == tok.content_hash and imported.eos_id == tok.eos_id
    assert imported.chat_template == loaded.chat_template


def test_transformers_loads_the_saved_folder(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.train(TRAIN[:1], 600, special_tokens=SPECIALS, eos_token="<|im_end|>")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(HELD_OUT, add_special_tokens=False)["input_ids"] == tok.encode(HELD_OUT, allowed_special="all")
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == tok.eos_id


# ---------------------------------------------------------------------------------------------------
# importing tokenizer.json files built with the tokenizers library


def hf_train(pre_tokenizer, specials: list[str], vocab_size: int = 900):
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(TRAIN, trainer)
    return hf


def save_json(data: dict, folder: Path, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def split_then_bytes(pattern: str):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def assert_same_ids(ours: Tokenizer, hf, text: str = HELD_OUT) -> None:
    ours.use_tiktoken = False  # the pure path; the fast path is compared where it applies
    assert ours.encode(text, allowed_special="all") == hf.encode(text, add_special_tokens=False).ids


def test_import_gpt2_style(tmp_path: Path) -> None:
    hf = hf_train(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"])
    folder = save_json(
        json.loads(hf.to_str()), tmp_path, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    )
    ours = Tokenizer.load(folder)
    assert ours.pattern_name == "gpt2" and ours.eos_id == ours.bos_id == 0 == hf.token_to_id("<|endoftext|>")
    assert ours.vocab_size == hf.get_vocab_size()
    assert_same_ids(ours, hf)
    assert ours.decode(hf.encode(HELD_OUT).ids) == hf.decode(
        hf.encode(HELD_OUT).ids, skip_special_tokens=False
    )


def test_import_llama3_style(tmp_path: Path) -> None:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    hf = hf_train(split_then_bytes(GPT4_PATTERN), [])
    hf.add_special_tokens(specials)  # after the merges, as in Llama-3
    hf.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        special_tokens=[("<|begin_of_text|>", hf.token_to_id("<|begin_of_text|>"))],
    )
    data = json.loads(hf.to_str())
    data["model"]["ignore_merges"] = True
    hf = tokenizers.Tokenizer.from_str(json.dumps(data))
    ours = Tokenizer.load(save_json(data, tmp_path, {"eos_token": "<|eot_id|>"}))
    assert ours.ignore_merges and ours.bos_id == hf.token_to_id("<|begin_of_text|>")
    assert ours.eos_id == hf.token_to_id("<|eot_id|>")
    text = HELD_OUT.replace("<|im_start|>", "<|begin_of_text|>").replace("<|endoftext|>", "<|eot_id|>")
    assert_same_ids(ours, hf, text)
    assert hf.encode(text).ids[0] == ours.bos_id  # HF's template adds BOS; our encode never does
    # ids follow merge order here, so the tiktoken export and fast path agree too
    ours.use_tiktoken = True
    assert (
        ours.to_tiktoken().encode(text, allowed_special="all")
        == hf.encode(text, add_special_tokens=False).ids
    )
    assert ours.encode(text, allowed_special="all") == hf.encode(text, add_special_tokens=False).ids


def test_import_qwen2_style(tmp_path: Path) -> None:
    hf = hf_train(split_then_bytes(QWEN2_PATTERN), [])
    hf.normalizer = tokenizers.normalizers.NFC()
    hf.add_special_tokens(SPECIALS)
    config = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": "{{ x }}",
    }
    ours = Tokenizer.load(save_json(json.loads(hf.to_str()), tmp_path, config))
    assert ours.normalizer == "NFC" and ours.chat_template == "{{ x }}" and ours.bos_id is None
    assert ours.eos_id == hf.token_to_id("<|im_end|>")
    assert_same_ids(ours, hf)  # HELD_OUT has a decomposed é that NFC composes
    with pytest.raises(InputError, match="normalizes text"):
        ours.to_tiktoken()
    ours.use_tiktoken = True  # the fast path is not exact here, so encode stays on the Python path
    assert ours._fast_encoding() is None


def test_ignore_merges_is_respected(tmp_path: Path) -> None:
    # "abc" exists as (ab, c), but merges reach (a, bc) first; only a whole-word lookup finds "abc"
    vocab = {chr(c): i for i, c in enumerate(sorted(ord(ch) for ch in _byte_alphabet()))}
    n = len(vocab)
    vocab.update({"bc": n, "ab": n + 1, "abc": n + 2})
    for ignore in (False, True):
        data = json.loads(Tokenizer([]).to_hf().to_str())
        data["model"].update(vocab=vocab, merges=[["b", "c"], ["a", "b"], ["ab", "c"]], ignore_merges=ignore)
        hf = tokenizers.Tokenizer.from_str(json.dumps(data))
        ours = Tokenizer.load(save_json(data, tmp_path / str(ignore)))
        assert ours.encode("abc") == hf.encode("abc").ids == ([n + 2] if ignore else [vocab["a"], n])


def _byte_alphabet() -> list[str]:
    from lmstack.tokenizer.hf_format import bytes_to_unicode

    return list(bytes_to_unicode().values())


def test_ids_out_of_merge_order_refuse_tiktoken(tok: Tokenizer, tmp_path: Path) -> None:
    data = json.loads(tok.to_hf().to_str())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300], sorted(vocab, key=vocab.get)[400]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # swap the ids of two merged tokens
    hf = tokenizers.Tokenizer.from_str(json.dumps(data))
    ours = Tokenizer.load(save_json(data, tmp_path))
    with pytest.raises(InputError, match="do not follow merge order"):
        ours.to_tiktoken()
    ours.use_tiktoken = True
    assert ours.encode(HELD_OUT, allowed_special="all") == hf.encode(HELD_OUT).ids


def test_sentencepiece_style_is_refused(tmp_path: Path) -> None:
    sp = tokenizers.SentencePieceBPETokenizer()
    sp.train_from_iterator(TRAIN[:1], vocab_size=400, show_progress=False)
    sp.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(InputError, match="SentencePiece-style .* only byte-level BPE"):
        Tokenizer.load(tmp_path)
    unigram = {"model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["a", -1.0]], "unk_id": 0}}
    with pytest.raises(InputError, match="SentencePiece-style"):
        Tokenizer.load(save_json(unigram, tmp_path / "unigram"))
    wordpiece = {
        "model": {"type": "WordPiece", "vocab": {"[UNK]": 0}},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
    }
    with pytest.raises(InputError, match="WordPiece model; lmstack imports only byte-level BPE"):
        Tokenizer.load(save_json(wordpiece, tmp_path / "wordpiece"))


# ---------------------------------------------------------------------------------------------------
# bad files


def test_corrupt_saved_files(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path)
    ours = tmp_path / "lmstack_tokenizer.json"
    text = ours.read_text()

    ours.write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match="lmstack_tokenizer.json is corrupt \\(not valid JSON"):
        Tokenizer.load(tmp_path)
    data = json.loads(text)
    data["merges"][5], data["merges"][6] = data["merges"][6], data["merges"][5]
    ours.write_text(json.dumps(data))
    with pytest.raises(InputError, match="corrupt"):
        Tokenizer.load(tmp_path)
    data = json.loads(text)
    data["merges"][-1] = [data["merges"][-1][0], 99999]
    ours.write_text(json.dumps(data))
    with pytest.raises(InputError, match="corrupt: merge .* uses an id that no byte"):
        Tokenizer.load(tmp_path)
    data = json.loads(text)
    data["special_tokens"]["<|extra|>"] = 7
    ours.write_text(json.dumps(data))
    with pytest.raises(InputError, match="corrupt"):
        Tokenizer.load(tmp_path)
    data = json.loads(text)
    del data["pattern"]
    ours.write_text(json.dumps(data))
    with pytest.raises(InputError, match="corrupt \\(bad or missing field"):
        Tokenizer.load(tmp_path)
    ours.write_text(json.dumps({**json.loads(text), "version": 99}))
    with pytest.raises(InputError, match="version 99.*upgrade lmstack"):
        Tokenizer.load(tmp_path)
    ours.write_text("[1, 2]")
    with pytest.raises(InputError, match="not an lmstack tokenizer file"):
        Tokenizer.load(tmp_path)
    ours.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(InputError, match="corrupt \\(not UTF-8"):
        Tokenizer.load(tmp_path)
    ours.unlink()
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="tokenizer.json is corrupt"):
        Tokenizer.load(tmp_path)


def test_missing_tokenizer_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="tokenizer folder not found"):
        Tokenizer.load(tmp_path / "nope")
    with pytest.raises(InputError, match="has neither lmstack_tokenizer.json nor tokenizer.json"):
        Tokenizer.load(tmp_path)
