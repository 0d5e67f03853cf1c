"""Hugging Face `tokenizer.json` / `tokenizer_config.json`: export, and import of byte-level BPE files.

A byte-level BPE `tokenizer.json` writes each token's bytes in GPT-2's byte-to-unicode alphabet (byte
0x20, a space, is written `Ġ`), so the vocabulary and merges are readable strings. We write it by hand
(saving needs no `tokenizers` package) with a `Split(regex)` + `ByteLevel` pre-tokenizer, and import
byte-level BPE files as `tokenizers` reads them: the vocabulary gives the ids and the merge list only
ranks pairs. A pre-tokenizer that is one regex (GPT-2's lone `ByteLevel`; Llama-3's and Qwen2's
`Split` + `ByteLevel(use_regex=false)`) becomes the tokenizer's `pattern`; any other chain of the
components in `components.py` (DeepSeek-V3's three `Split`s, StarCoder's `Digits` + `ByteLevel`) is
kept as its spec. Normalizers and added tokens (special or not, `normalized` or not) likewise.

SentencePiece-style files (Metaspace `▁`, byte fallback, Unigram) are refused with a clear error, as
are options we would silently get wrong. The exported file never inserts BOS/EOS by itself
(post-processor `ByteLevel`), so `hf.encode(text).ids == tok.encode(text, allowed_special="all")`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from lmstack.errors import InputError
from lmstack.tokenizer.components import compile_normalizer, compile_pre_tokenizer, plain_pattern
from lmstack.tokenizer.types import T, TokenizerLike

HF_TOKENIZER = "tokenizer.json"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used in tokenizer.json vocabularies.

    Printable Latin-1 bytes stand for themselves; the other 68 (control bytes, space, ...) are shifted
    to U+0100 and up, so that no token string contains whitespace or control characters.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    shifted = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _to_hf_text(data: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of `bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


def _from_hf_text(text: str, source: str) -> bytes:
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in text)
    except KeyError:
        raise InputError(
            f"{source}: vocabulary token {text!r} is not in the byte-level alphabet — only byte-level BPE "
            "tokenizers (GPT-2, Llama-3, Qwen2 style) can be imported"
        ) from None


def to_hf_json(tok: TokenizerLike) -> dict[str, Any]:
    """The `tokenizer.json` document for this tokenizer (as a dict)."""
    specials = set(tok._specials.values()) | set(tok._added.values())
    vocab = {
        _to_hf_text(data): i for i, data in enumerate(tok._id_bytes) if data is not None and i not in specials
    }
    merges = [[_to_hf_text(tok._id_bytes[a]), _to_hf_text(tok._id_bytes[b])] for a, b, _ in tok._merges]
    added = [(i, s, True) for s, i in tok._specials.items()] + [(i, s, False) for s, i in tok._added.items()]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": s,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": s in tok.normalized_tokens,
                "special": special,
            }
            for i, s, special in sorted(added)
        ],
        "normalizer": {"type": tok.normalizer} if isinstance(tok.normalizer, str) else tok.normalizer,
        "pre_tokenizer": tok.pre_tokenizer
        or {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": False,
            "use_regex": True,
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": tok.ignore_merges,
            "vocab": vocab,
            "merges": merges,
        },
    }


def to_hf_config(tok: TokenizerLike) -> dict[str, Any]:
    """The `tokenizer_config.json` that lets `transformers.AutoTokenizer` load the folder."""
    names = {i: s for s, i in {**tok._added, **tok._specials}.items()}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token,
        "eos_token": names.get(tok.eos_id) if tok.eos_id is not None else None,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": s in tok._specials,
            }
            for i, s in sorted(names.items())
        },
        "lmstack_content_hash": tok.content_hash,
    }
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    return config


def to_hf(tok: TokenizerLike) -> Any:
    """A `tokenizers.Tokenizer` (imported lazily: `tokenizers` is a test-only extra)."""
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_str(json.dumps(to_hf_json(tok)))


def from_hf_json(
    cls: type[T], data: dict[str, Any], config: dict[str, Any] | None = None, source: str = HF_TOKENIZER
) -> T:
    """A `cls` from a byte-level BPE `tokenizer.json` (GPT-2, Llama-3, Qwen2 style), keeping its ids."""
    model = data.get("model") or {}
    _refuse_non_byte_level(data, model, source)
    pre_spec = data.get("pre_tokenizer")
    compile_pre_tokenizer(pre_spec, source)  # refuses what we cannot reproduce, naming the component
    pattern = plain_pattern(pre_spec)
    normalizer = _hf_normalizer(data.get("normalizer"), source)
    for option in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(option):
            raise InputError(f"{source}: BPE option {option}={model[option]!r} is not supported")

    added: dict[str, int] = {}
    specials: dict[str, int] = {}
    normalized: list[str] = []
    for entry in data.get("added_tokens") or []:
        if entry.get("lstrip") or entry.get("rstrip") or entry.get("single_word"):
            raise InputError(
                f"{source}: added token {entry['content']!r} uses lstrip/rstrip/single_word, which lmstack does not support"
            )
        (specials if entry.get("special") else added)[entry["content"]] = int(entry["id"])
        if entry.get("normalized") and normalizer is not None:
            if entry.get("special"):
                raise InputError(
                    f"{source}: special token {entry['content']!r} is matched after normalization "
                    '("normalized": true), which lmstack supports only for non-special added tokens'
                )
            normalized.append(entry["content"])
    reserved = set(specials.values()) | set(added.values())

    vocab_ids: dict[bytes, int] = {}
    text_ids: dict[str, int] = {}
    for text, token_id in (model.get("vocab") or {}).items():
        if token_id not in reserved:
            vocab_ids[_from_hf_text(text, source)] = text_ids[text] = int(token_id)
    missing = [b for b in range(256) if bytes([b]) not in vocab_ids]
    if missing:
        raise InputError(
            f"{source}: the vocabulary lacks {len(missing)} of the 256 byte tokens — not a byte-level BPE"
        )
    byte_ids = [vocab_ids[bytes([b])] for b in range(256)]

    # The vocabulary gives ids; the merge list only ranks pairs (as in `tokenizers`).
    merges = []
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        try:  # the byte-level alphabet maps bytes to characters one to one, so strings concatenate alike
            merges.append((text_ids[left], text_ids[right], text_ids[left + right]))
        except KeyError:
            raise InputError(
                f"{source}: merge {rank} ({left!r}, {right!r}) uses or makes a token not in the vocabulary"
            ) from None
    byte_set = set(byte_ids)
    extra = {i: data_ for data_, i in vocab_ids.items() if i not in byte_set}

    config = config or {}
    bos = _token_name(config.get("bos_token")) or _template_bos(data.get("post_processor"))
    eos = _token_name(config.get("eos_token"))
    known = set(specials) | set(added)
    template = config.get("chat_template") or ""
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t.get("template", "") for t in template if t.get("name") == "default"), "")
    return cls(
        merges,
        pattern=pattern or "gpt2",  # unused when pre_tokenizer is set
        pre_tokenizer=None if pattern is not None else pre_spec,
        normalized_tokens=normalized,
        special_tokens=specials,
        byte_ids=byte_ids,
        extra_tokens=extra,
        added_tokens=added,
        normalizer=normalizer,
        ignore_merges=bool(model.get("ignore_merges", False)),
        bos_token=bos if bos in known else None,
        eos_token=eos if eos in known else None,
        chat_template=template,
    )


def _refuse_non_byte_level(data: dict[str, Any], model: dict[str, Any], source: str) -> None:
    text = json.dumps(
        {k: data.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")}, ensure_ascii=False
    )
    kind = model.get("type")
    if kind == "Unigram" or model.get("byte_fallback") or "Metaspace" in text or "\u2581" in text:
        raise InputError(
            f"{source} is a SentencePiece-style tokenizer ({kind}, Metaspace/byte-fallback); lmstack imports "
            "only byte-level BPE (GPT-2, Llama-3, Qwen2 style) — load it with transformers.AutoTokenizer, "
            "or train a byte-level one with `lmstack tokenizer train`"
        )
    if kind != "BPE":
        raise InputError(f"{source} has a {kind} model; lmstack imports only byte-level BPE tokenizers")


def _hf_normalizer(normalizer: dict[str, Any] | None, source: str) -> str | dict[str, Any] | None:
    """None, a plain name ("NFC") for a single Unicode normalizer, or the spec of a chain."""
    if compile_normalizer(normalizer, source) is None:
        return None
    return normalizer["type"] if normalizer.get("type") in ("NFC", "NFKC", "Lowercase") else normalizer


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_bos(post: dict[str, Any] | None) -> str | None:
    """The BOS a TemplateProcessing post-processor prepends (Llama-3), if any."""
    processors = (post or {}).get("processors") if (post or {}).get("type") == "Sequence" else [post]
    for proc in processors or []:
        if proc and proc.get("type") == "TemplateProcessing":
            first = (proc.get("single") or [{}])[0]
            if "SpecialToken" in first:
                return first["SpecialToken"]["id"]
    return None
