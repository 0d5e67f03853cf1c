"""Tokenizer files: our `lmstack_tokenizer.json`, folders (save/load), and the tiktoken export.

- `lmstack_tokenizer.json` (ours): versioned, human-readable JSON holding the merges as ids, one per
  line, with the specials, pattern and chat template, and a `content_hash` checked on load (a corrupt or
  hand-edited file is an error, not a silently different tokenizer).
- A folder holds ours plus Hugging Face's `tokenizer.json` + `tokenizer_config.json` (`hf_format.py`);
  `load` prefers ours and otherwise imports the Hugging Face file.
- tiktoken: an `Encoding` built from our ranks. tiktoken merges by the rank of the concatenated bytes;
  for vocabularies learned by BPE whose ids follow merge order this equals merging by merge rank, so we
  refuse vocabularies where it would not.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmstack.atomic import atomic_write_text
from lmstack.errors import InputError
from lmstack.textfile import read_text_file
from lmstack.tokenizer.hf_format import HF_TOKENIZER, from_hf_json, to_hf, to_hf_config, to_hf_json
from lmstack.tokenizer.merge import merge_piece
from lmstack.tokenizer.pretokenize import TIKTOKEN_ENCODINGS
from lmstack.tokenizer.types import T, TokenizerLike
from lmstack.tokenizer.vocab import extra_tokens

FORMAT_NAME = "lmstack_tokenizer"
FORMAT_VERSION = 1
OURS = "lmstack_tokenizer.json"
HF_CONFIG = "tokenizer_config.json"


# ---------------------------------------------------------------------------------------------------
# our format


def to_lmstack_json(tok: TokenizerLike) -> str:
    """Our file, as text: readable fields first, then one merge per line."""
    standard = tok._byte_ids == list(range(256)) and all(m[2] == 256 + r for r, m in enumerate(tok._merges))
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "vocab_size": tok.vocab_size,
        "pattern_name": tok.pattern_name,
        "pattern": tok.pattern,
        "normalizer": tok.normalizer,
        "pre_tokenizer": tok.pre_tokenizer,
        "normalized_tokens": list(tok.normalized_tokens),
        "ignore_merges": tok.ignore_merges,
        "rank_by_token_id": tok.rank_by_token_id,
        "special_tokens": tok._specials,
        "added_tokens": tok._added,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "chat_template": tok.chat_template,
        "content_hash": tok.content_hash,
        "byte_ids": None if standard else tok._byte_ids,
        "extra_tokens": {str(i): data.hex() for i, data in extra_tokens(tok._vocab).items()},
        "merge_layout": "pairs: merge i makes id 256 + i" if standard else "triples: [left, right, new id]",
    }
    lines = ["{"]
    lines += [
        f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}," for key, value in header.items()
    ]
    merges = [json.dumps(list(m[:2]) if standard else list(m)) for m in tok._merges]
    lines.append('  "merges": [' + ("" if merges else "]"))
    if merges:
        lines += [f"    {m}," for m in merges[:-1]] + [f"    {merges[-1]}", "  ]"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def from_lmstack_json(cls: type[T], text: str, source: str = OURS) -> T:
    """Parse our file into a `cls`; any inconsistency is an `InputError` naming the file."""
    fix = "re-save it with Tokenizer.save(), or delete it to fall back to tokenizer.json"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source} is corrupt (not valid JSON: {exc}) — {fix}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise InputError(f'{source} is not an lmstack tokenizer file (no "format": "{FORMAT_NAME}") — {fix}')
    version = data.get("version")
    if version != FORMAT_VERSION:
        raise InputError(
            f"{source} has format version {version!r}; this lmstack reads version {FORMAT_VERSION} — "
            "upgrade lmstack or re-save the tokenizer"
        )
    try:
        tok = cls(
            [tuple(m) for m in data["merges"]],
            pattern=data["pattern"],
            special_tokens=dict(data["special_tokens"]),
            byte_ids=data.get("byte_ids"),
            extra_tokens={int(i): bytes.fromhex(h) for i, h in data.get("extra_tokens", {}).items()},
            added_tokens=data.get("added_tokens") or {},
            normalizer=data.get("normalizer"),
            pre_tokenizer=data.get("pre_tokenizer"),
            normalized_tokens=data.get("normalized_tokens") or (),
            ignore_merges=data.get("ignore_merges", False),
            rank_by_token_id=data.get("rank_by_token_id", False),
            bos_token=data.get("bos_token"),
            eos_token=data.get("eos_token"),
            chat_template=data.get("chat_template", ""),
        )
    except InputError as exc:
        raise InputError(f"{source} is corrupt: {exc} — {fix}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"{source} is corrupt (bad or missing field: {exc!r}) — {fix}") from None
    if data.get("content_hash") not in (None, tok.content_hash):
        raise InputError(f"{source} is corrupt: its content_hash does not match its merges — {fix}")
    return tok


# ---------------------------------------------------------------------------------------------------
# tiktoken


def tiktoken_compatible(tok: TokenizerLike) -> str | None:
    """Why this tokenizer cannot be a tiktoken Encoding that gives the same ids, or None if it can."""
    if tok.normalizer:
        return f"it normalizes text ({tok.normalizer}), which tiktoken cannot do"
    if tok.pre_tokenizer is not None:
        return "its pre-tokenizer is a chain of steps, not one regex tiktoken can apply"
    if tok._added:
        return "it has non-special added tokens, which tiktoken cannot match"
    new_ids = [m[2] for m in tok._merges]
    if tok.rank_by_token_id:  # tiktoken's own rule (from_tiktoken lists every pair forming each token)
        return None
    if any(a > b for a, b in zip(new_ids, new_ids[1:])) or (new_ids and min(new_ids) <= max(tok._byte_ids)):
        return "its ids do not follow merge order (tiktoken merges by id), so the two would disagree"
    # Several merges may make one token (Llama-3): tiktoken ranks them alike and takes the leftmost,
    # we take the first listed. That differs only when two of them can overlap, (a, b) and (b, c).
    lefts: dict[int, set[int]] = {}
    for left, _, new_id in tok._merges:
        lefts.setdefault(new_id, set()).add(left)
    for left, right, new_id in tok._merges:
        if len(lefts[new_id]) > 1 and right in lefts[new_id] - {left}:
            return (
                f"two merges making token {new_id} can overlap, where tiktoken and BPE break ties differently"
            )
    specials = set(tok._specials.values())
    made = set(tok._byte_ids) | set(new_ids)
    if any(data is not None and i not in made and i not in specials for i, data in enumerate(tok._id_bytes)):
        return "it has tokens that no merge produces"
    # tiktoken merges any adjacent pair whose bytes form a token; merge-by-rank only merges listed pairs.
    # They agree when every token's own bytes encode back to that one token (true for merges learned by
    # BPE): then a pair whose bytes form token T can only be T's own merge pair.
    for _, _, new_id in tok._merges:
        data = tok._id_bytes[new_id]
        if merge_piece([tok._byte_ids[b] for b in data], tok._ranks) != [new_id]:
            return f"token {new_id} ({data!r}) does not encode to itself by its merges, so the two would disagree"
    return None


def to_tiktoken(tok: TokenizerLike) -> Any:
    """A `tiktoken.Encoding` with our ranks (never `tiktoken.get_encoding`, which downloads)."""
    reason = tiktoken_compatible(tok)
    if reason is not None:
        raise InputError(f"cannot export this tokenizer to tiktoken: {reason}")
    import tiktoken

    ranks = {
        tok._id_bytes[i]: i for i in [*tok._byte_ids, *(m[2] for m in tok._merges), *extra_tokens(tok._vocab)]
    }
    return tiktoken.Encoding(
        name=f"lmstack-{tok.content_hash[:12]}",
        pat_str=tok.pattern,
        mergeable_ranks=ranks,
        special_tokens=dict(tok._specials),
    )


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """A `.tiktoken` file: one `base64(token bytes) rank` per line."""
    path = Path(path)
    text = read_text_file(path, what="tiktoken rank file")
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except (ValueError, binascii.Error):
            raise InputError(
                f"{path} line {number} is not `base64-token rank`: {line[:80]!r} — is it a .tiktoken file?"
            ) from None
    if len(set(ranks.values())) != len(ranks):
        raise InputError(f"{path} gives two tokens the same rank — the file is corrupt")
    ranks.pop(b"", None)  # Whisper's multilingual file ranks an empty token ("="), which nothing produces
    return ranks


def from_tiktoken(
    cls: type[T],
    path: str | os.PathLike,
    *,
    name: str | None = None,
    pattern: str | None = None,
    special_tokens: Mapping[str, int] | None = None,
) -> T:
    """A `cls` with tiktoken's ranks as ids, encoding exactly as `tiktoken.Encoding` does.

    tiktoken merges, within a piece, the adjacent pair whose concatenated bytes have the lowest rank
    (leftmost on ties), after looking the whole piece up first. So every split of every token into two
    tokens becomes a merge ranked by the token's id (`rank_by_token_id`), and `ignore_merges` does the
    whole-piece lookup. Tokens no pair forms stay reachable through that lookup.
    """
    if name is not None and name not in TIKTOKEN_ENCODINGS:
        raise InputError(f"unknown tiktoken encoding {name!r} — one of {', '.join(TIKTOKEN_ENCODINGS)}")
    preset_pattern, preset_specials = TIKTOKEN_ENCODINGS.get(name, (None, {}))
    pattern = pattern or preset_pattern
    if pattern is None:
        raise InputError(
            f"{path}: a .tiktoken file holds only ranks — pass name= (one of {', '.join(TIKTOKEN_ENCODINGS)}) "
            "or the split pattern="
        )
    ranks = read_tiktoken_ranks(path)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise InputError(f"{path} lacks {len(missing)} of the 256 single-byte tokens — not a byte-level BPE")
    merges = []
    for data, token_id in sorted(ranks.items(), key=lambda item: item[1]):
        for cut in range(1, len(data)):
            left, right = ranks.get(data[:cut]), ranks.get(data[cut:])
            if left is not None and right is not None:
                merges.append((left, right, token_id))
    return cls(
        merges,
        pattern=pattern,
        special_tokens=dict(preset_specials if special_tokens is None else special_tokens),
        byte_ids=[ranks[bytes([b])] for b in range(256)],
        extra_tokens={i: data for data, i in ranks.items() if len(data) > 1},
        ignore_merges=True,
        rank_by_token_id=True,
    )


def from_gpt2_files(cls: type[T], encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> T:
    """GPT-2's original release: `encoder.json` (token -> id, in the byte-level alphabet) and `vocab.bpe`
    (the merges, one "left right" per line after a `#version` header). `<|endoftext|>` is special."""
    source = str(encoder_json)
    encoder = _parse_json(read_text_file(encoder_json, what="GPT-2 encoder.json"), source)
    lines = read_text_file(vocab_bpe, what="GPT-2 vocab.bpe").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    end = "<|endoftext|>"
    data = {
        "model": {"type": "BPE", "vocab": encoder, "merges": merges},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "added_tokens": [{"id": encoder[end], "content": end, "special": True}] if end in encoder else [],
    }
    return from_hf_json(cls, data, {"eos_token": end}, source)


# ---------------------------------------------------------------------------------------------------
# folders


def save(tok: TokenizerLike, directory: str | os.PathLike) -> Path:
    """Write our file and the two Hugging Face files into `directory` (created), each atomically."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} exists and is not a folder — choose another output folder")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / OURS, to_lmstack_json(tok))
    atomic_write_text(directory / HF_TOKENIZER, json.dumps(to_hf_json(tok), ensure_ascii=False, indent=1))
    atomic_write_text(directory / HF_CONFIG, json.dumps(to_hf_config(tok), ensure_ascii=False, indent=2))
    return directory


def load(cls: type[T], directory: str | os.PathLike) -> T:
    """A `cls` from `lmstack_tokenizer.json`, else imported from `tokenizer.json` (+ `tokenizer_config.json`)."""
    path = Path(directory)
    if path.is_file() and path.name in (OURS, HF_TOKENIZER):
        path = path.parent
    if not path.is_dir():
        raise InputError(
            f"tokenizer folder not found: {path} — pass the folder `lmstack tokenizer train --out` wrote"
        )
    if (path / OURS).is_file():
        return from_lmstack_json(cls, _read(path / OURS), str(path / OURS))
    if (path / HF_TOKENIZER).is_file():
        source = str(path / HF_TOKENIZER)
        data = _parse_json(_read(path / HF_TOKENIZER), source)
        config = (
            _parse_json(_read(path / HF_CONFIG), str(path / HF_CONFIG))
            if (path / HF_CONFIG).is_file()
            else None
        )
        try:
            return from_hf_json(cls, data, config, source)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(
                f"{source} is malformed ({exc!r}) — is it a Hugging Face tokenizer.json?"
            ) from None
    raise InputError(
        f"{path} has neither {OURS} nor {HF_TOKENIZER} — train one with `lmstack tokenizer train` "
        "or point to a folder that has one"
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path} is corrupt (not UTF-8 at byte {exc.start}) — re-save or re-download it"
        ) from None


def _parse_json(text: str, source: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source} is corrupt (not valid JSON: {exc}) — re-save or re-download it") from None
    if not isinstance(data, dict):
        raise InputError(f"{source} is corrupt (expected a JSON object) — re-save or re-download it")
    return data


__all__ = [
    "from_lmstack_json",
    "load",
    "save",
    "tiktoken_compatible",
    "to_hf",
    "to_lmstack_json",
    "to_tiktoken",
]
