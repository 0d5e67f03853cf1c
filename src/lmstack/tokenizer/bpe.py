"""The byte-level BPE tokenizer: train, encode, decode.

Byte-level BPE starts from the 256 possible bytes, so every string has an encoding (no unknown token),
and grows the vocabulary by merging the most frequent adjacent pair, again and again (Sennrich et al.
2016, BPE for subword units; Radford et al. 2019, byte-level). In a tokenizer we train:

    ids 0..255            the raw bytes
    id 256 + i            merge i (its bytes are the concatenation of the pair's bytes)
    after the merges      special tokens (`<|endoftext|>`, chat-role markers), in the order given

`vocab_size` counts all three. Imported Hugging Face vocabularies keep their own ids (GPT-2 numbers the
bytes in its own order, and Llama-3 puts 256 specials after 128,000 merges); everything below works on
the general form "pair of ids -> (rank, new id)".

Encoding: text -> (special tokens split out) -> pre-tokenize with the split regex -> each piece's UTF-8
bytes -> apply merges by rank (`merge.py`) -> ids. A piece's ids are cached, since a few thousand pieces
(" the", ",", "\\n") make up most text. Decoding concatenates each id's bytes and decodes UTF-8.

Fast path (optional): with the `tiktoken` package installed (`pip install 'lmstack[fast]'`), a
vocabulary tiktoken can reproduce exactly is encoded by tiktoken's Rust core; `use_tiktoken = False`
forces the pure-Python path. Nothing else here needs packages beyond `regex`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import regex

from lmstack.errors import InputError
from lmstack.tokenizer import chat, formats
from lmstack.tokenizer.components import compile_normalizer, compile_pre_tokenizer
from lmstack.tokenizer.merge import merge_piece
from lmstack.tokenizer.pretokenize import (
    count_pieces,
    pattern_name,
    resolve_pattern,
    special_splitter,
    split_pieces,
)
from lmstack.tokenizer.streaming import StreamingDecoder
from lmstack.tokenizer.trainer import train_merges
from lmstack.tokenizer.vocab import build_vocab, content_hash, identity

CACHE_MAX_PIECES = 200_000  # the piece cache is cleared when it reaches this many entries
_SURROGATE = regex.compile(r"[\ud800-\udfff]")


class Tokenizer:
    """A byte-level BPE tokenizer. Build one with `Tokenizer.train(...)` or `Tokenizer.load(dir)`.

    The constructor takes the learned state directly; `merges` is a list of `(left, right)` pairs (merge i
    makes id 256 + i) or, for imported vocabularies, `(left, right, new_id)` triples, in rank order.
    `special_tokens` is a list of strings (ids assigned after the merges) or a dict string -> id.

    Imported vocabularies may also carry: `normalizer` (a name or a tokenizer.json spec), `pre_tokenizer`
    (a tokenizer.json spec of a chain of pre-tokenizers, used instead of `pattern`; `components.py`),
    `added_tokens` (non-special, always matched) of which `normalized_tokens` are matched after
    normalization, `ignore_merges` (look a whole piece up first) and `rank_by_token_id` (tiktoken's
    merge priority: the id of the token a pair makes, instead of the merge's place in the list).
    """

    def __init__(
        self,
        merges: Sequence[Sequence[int]],
        *,
        pattern: str = "gpt4",
        special_tokens: Sequence[str] | Mapping[str, int] = (),
        byte_ids: Sequence[int] | None = None,
        extra_tokens: Mapping[int, bytes] | None = None,
        added_tokens: Mapping[str, int] | None = None,
        normalizer: str | Mapping[str, Any] | None = None,
        pre_tokenizer: Mapping[str, Any] | None = None,
        normalized_tokens: Sequence[str] = (),
        ignore_merges: bool = False,
        rank_by_token_id: bool = False,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str = "",
    ) -> None:
        self.pattern = resolve_pattern(pattern)
        self._compiled = regex.compile(self.pattern)
        self.normalizer = (
            normalizer if normalizer is None or isinstance(normalizer, str) else dict(normalizer)
        )
        self._normalize = compile_normalizer(self.normalizer)
        self.pre_tokenizer = None if pre_tokenizer is None else dict(pre_tokenizer)
        self._pre_tokenize = (
            compile_pre_tokenizer(self.pre_tokenizer)
            if self.pre_tokenizer is not None
            else partial(split_pieces, self._compiled)
        )
        self.ignore_merges = bool(ignore_merges)

        self.rank_by_token_id = bool(rank_by_token_id)
        self._vocab = vocab = build_vocab(
            merges, special_tokens, byte_ids, extra_tokens, added_tokens, self.rank_by_token_id
        )
        self._byte_ids, self._merges, self._ranks = vocab.byte_ids, vocab.merges, vocab.ranks
        self._id_bytes, self._bytes_to_id = vocab.id_bytes, vocab.bytes_to_id
        self._specials, self._added = vocab.specials, vocab.added
        specials = self._specials

        unknown = [t for t in normalized_tokens if t not in self._added]
        if unknown:
            raise InputError(
                f"normalized tokens {unknown} are not non-special added tokens of this tokenizer"
            )
        # Added tokens marked "normalized" are found in the normalized text (as in `tokenizers`), so they
        # are looked up by their normalized content.
        self.normalized_tokens = tuple(normalized_tokens) if self._normalize else ()
        norm = self._normalize or (lambda text: text)
        self._normalized_added = {norm(t): self._added[t] for t in self.normalized_tokens}
        for text, token_id in self._normalized_added.items():  # and decode to it, as in `tokenizers`
            self._id_bytes[token_id] = text.encode("utf-8")
        self._raw_added = {t: i for t, i in self._added.items() if t not in self.normalized_tokens}
        self._normalized_splitter = special_splitter(self._normalized_added)
        for role, name in (("bos_token", bos_token), ("eos_token", eos_token)):
            if name is not None and name not in specials and name not in self._added:
                raise InputError(f"{role} {name!r} is not one of the special tokens {list(specials)}")
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.use_tiktoken = True  # the explicit switch: set False to force the pure-Python encoder
        self._cache: dict[str, list[int]] = {}
        self._splitters: dict[tuple[frozenset[str], bool], regex.Pattern | None] = {}
        self._tiktoken: Any = None  # built on first use: a tiktoken.Encoding, or False if unavailable

    # ----------------------------------------------------------------------------------------------
    # training

    @classmethod
    def train(
        cls,
        inputs: Iterable[str] | Iterable[os.PathLike] | os.PathLike,
        vocab_size: int,
        *,
        pattern: str = "gpt4",
        special_tokens: Sequence[str] = (),
        progress: bool = False,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> Tokenizer:
        """Learn a tokenizer of `vocab_size` ids = 256 bytes + merges + `special_tokens`.

        `inputs`: an iterable of documents (strings), or a list of text-file paths (`pathlib.Path`, or
        strings naming existing files), read as UTF-8 and streamed. `pattern`: "gpt4" (cl100k, default),
        "gpt2", or a custom regex. Special-token strings found in the corpus separate text and are not
        learned from. If the corpus runs out of pairs before `vocab_size`, training stops early with a
        warning and the tokenizer is smaller.
        """
        specials = list(special_tokens)
        if any(not isinstance(s, str) or not s for s in specials):
            raise InputError("special tokens must be non-empty strings, e.g. '<|endoftext|>'")
        if len(set(specials)) != len(specials):
            raise InputError(f"special tokens must be distinct, got {specials}")
        minimum = 256 + len(specials)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
            raise InputError(
                f"vocab size {vocab_size} is too small: it must be at least 256 (one id per byte) "
                f"+ {len(specials)} special tokens = {minimum} — raise the vocab size"
            )
        pattern = resolve_pattern(pattern)
        counts = count_pieces(inputs, pattern, specials)
        if not counts:
            raise InputError("the training inputs contain no text — pass non-empty files or documents")
        try:
            words = [(piece.encode("utf-8"), count) for piece, count in counts.items()]
        except UnicodeEncodeError as exc:
            raise InputError(
                f"training text contains a lone surrogate {exc.object[exc.start]!r} — clean the documents "
                "(e.g. text.encode('utf-8', 'replace').decode())"
            ) from None
        del counts
        n_merges = vocab_size - minimum
        merges = train_merges(words, n_merges, progress=progress)
        if len(merges) < n_merges:
            warnings.warn(
                f"the corpus ran out of pairs after {len(merges)} of {n_merges} merges; the vocabulary has "
                f"{256 + len(merges) + len(specials)} ids instead of {vocab_size}",
                stacklevel=2,
            )
        return cls(merges, pattern=pattern, special_tokens=specials, bos_token=bos_token, eos_token=eos_token)

    # ----------------------------------------------------------------------------------------------
    # encoding

    def encode(self, text: str, *, allowed_special: Iterable[str] | str = frozenset()) -> list[int]:
        """Encode `text`; special-token strings become special ids only where allowed.

        As in tiktoken, text that contains a special token's string raises unless that token is in
        `allowed_special` (a set of strings, or "all"); use `encode_ordinary` to treat such strings as
        plain text. Raises `ValueError` for a lone surrogate, naming its index.
        """
        self._check_text(text)
        if allowed_special == "all":
            allowed = frozenset(self._specials)
        elif isinstance(allowed_special, str):
            raise InputError(
                f"allowed_special must be 'all' or a set of special tokens, not {allowed_special!r}"
            )
        else:
            allowed = frozenset(allowed_special)
            unknown = allowed - set(self._specials)
            if unknown:
                raise InputError(
                    f"allowed_special has unknown tokens {sorted(unknown)}; known: {list(self._specials)}"
                )
        disallowed = self._splitter(frozenset(self._specials) - allowed, {})
        match = disallowed.search(text) if disallowed is not None else None
        if match is not None:
            raise InputError(
                f"text contains the special token {match.group()!r} at index {match.start()} — pass "
                f"allowed_special={{{match.group()!r}}} (or 'all') to encode it as a special token, "
                "or use encode_ordinary() to encode it as plain text"
            )
        return self._encode(text, allowed)

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text` ignoring special tokens entirely: their strings are plain text (training data)."""
        self._check_text(text)
        return self._encode(text, frozenset())

    def _encode(self, text: str, allowed: frozenset[str]) -> list[int]:
        encoding = self._fast_encoding()
        if encoding:
            return encoding.encode(text, allowed_special=allowed, disallowed_special=())
        always = {**self._raw_added, **{s: self._specials[s] for s in allowed}}
        splitter = self._splitter(allowed, self._raw_added)
        if splitter is None:
            return self._encode_chunk(text)
        ids: list[int] = []
        start = 0
        for match in splitter.finditer(text):
            ids += self._encode_chunk(text[start : match.start()])
            ids.append(always[match.group()])
            start = match.end()
        ids += self._encode_chunk(text[start:])
        return ids

    def _splitter(self, specials: frozenset[str], added: dict[str, int]) -> regex.Pattern | None:
        """The (cached) regex finding these special tokens plus the always-matched added tokens."""
        key = (specials, bool(added))
        if key not in self._splitters:
            self._splitters[key] = special_splitter([*specials, *added])
        return self._splitters[key]

    def _encode_chunk(self, text: str) -> list[int]:
        """Normalize text free of specials, cut out normalized added tokens, encode the rest."""
        if self._normalize is not None:
            text = self._normalize(text)
        if self._normalized_splitter is None:
            return self._encode_pieces(text)
        ids: list[int] = []
        start = 0
        for match in self._normalized_splitter.finditer(text):
            ids += self._encode_pieces(text[start : match.start()])
            ids.append(self._normalized_added[match.group()])
            start = match.end()
        return ids + self._encode_pieces(text[start:])

    def _encode_pieces(self, text: str) -> list[int]:
        """Pre-tokenize normalized text and encode each piece, through the piece cache."""
        cache = self._cache
        ids: list[int] = []
        for piece in self._pre_tokenize(text):
            piece_ids = cache.get(piece)
            if piece_ids is None:  # a miss: rare once the common pieces are cached
                if len(cache) >= CACHE_MAX_PIECES:
                    cache.clear()
                piece_ids = cache[piece] = self._encode_piece(piece.encode("utf-8"))
            ids += piece_ids
        return ids

    def _piece_ids(self, piece: str) -> list[int]:
        """The ids of one piece, through the cache (the loop in `_encode_chunk` inlines this)."""
        piece_ids = self._cache.get(piece)
        if piece_ids is None:
            if len(self._cache) >= CACHE_MAX_PIECES:
                self._cache.clear()
            piece_ids = self._cache[piece] = self._encode_piece(piece.encode("utf-8"))
        return piece_ids

    def _encode_piece(self, data: bytes) -> list[int]:
        if self.ignore_merges and data in self._bytes_to_id:  # Llama-3 style: whole-piece lookup first
            return [self._bytes_to_id[data]]
        byte_ids = self._byte_ids
        return merge_piece([byte_ids[b] for b in data], self._ranks)

    def _check_text(self, text: str) -> None:
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}")
        match = _SURROGATE.search(text)
        if match is not None:
            raise InputError(
                f"text has a lone surrogate U+{ord(match.group()):04X} at index {match.start()}, which is "
                "not encodable as UTF-8 — fix the text (e.g. decode the source with errors='replace')"
            )

    def _fast_encoding(self) -> Any:
        """tiktoken's Encoding for this vocabulary when the fast path is on, available and exact, else None.

        The fast path is optional: it needs the `tiktoken` package (`pip install 'lmstack[fast]'`).
        Without it, or for a vocabulary tiktoken cannot reproduce exactly (a normalizer, a chain of
        pre-tokenizers, a custom regex, merges out of id order), encoding stays on the pure-Python
        path, which gives the same ids (the tests compare the two).
        """
        if not self.use_tiktoken:
            return None
        if self._tiktoken is None:
            self._tiktoken = False
            # Only the built-in patterns are known to split identically in tiktoken's regex engine; a
            # custom pattern stays on the pure-Python path rather than risk a silent disagreement.
            if self.pattern_name == "custom" or self.pre_tokenizer is not None:
                return None
            if importlib.util.find_spec("tiktoken") is None:  # the optional extra is not installed
                return None
            with contextlib.suppress(InputError, ValueError):  # not exact, or the regex refused
                self._tiktoken = formats.to_tiktoken(self)
        return self._tiktoken or None

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """A conversation's ids and assistant mask, by the chat template or the plain transcript.

        See `lmstack.tokenizer.chat`: the mask marks each assistant message's content and end token.
        """
        return chat.render_chat(self, messages, add_generation_prompt=add_generation_prompt)

    # ----------------------------------------------------------------------------------------------
    # decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The concatenated bytes of `ids` (special tokens give their UTF-8 string)."""
        table = self._id_bytes
        ids = list(ids)
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            bad = next(i for i in ids if not self._known_id(i))
            raise InputError(
                f"token id {bad!r} is not in this tokenizer (vocab size {self.vocab_size})"
            ) from None

    def _known_id(self, token_id: Any) -> bool:
        try:
            return 0 <= token_id < len(self._id_bytes) and self._id_bytes[token_id] is not None
        except TypeError:
            return False

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text. Byte sequences that are not valid UTF-8 (a sequence cut mid-character,
        or ids a model sampled in a bad order) become U+FFFD, as in `bytes.decode(errors="replace")`."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token gives its UTF-8 string)."""
        return self.decode_bytes([token_id])

    def stream_decoder(self) -> StreamingDecoder:
        """A decoder for generated tokens that emits text only once characters are complete."""
        return StreamingDecoder(self)

    # ----------------------------------------------------------------------------------------------
    # properties

    @property
    def vocab_size(self) -> int:
        """Number of ids (bytes + merges + specials); every id is below it."""
        return len(self._id_bytes)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token string -> id (a copy)."""
        return dict(self._specials)

    @property
    def eos_id(self) -> int | None:
        """The end-of-sequence id: the declared `eos_token`, else `<|endoftext|>` if present, else None
        (never a guess: separating documents with, say, `<|im_start|>` would be silently wrong)."""
        if self.eos_token is not None:
            return self._specials.get(self.eos_token, self._added.get(self.eos_token))
        return self._specials.get("<|endoftext|>")

    @property
    def bos_id(self) -> int | None:
        """The beginning-of-sequence id: None unless a `bos_token` is declared (train(..., bos_token=),
        or an imported tokenizer_config.json / Llama-3 style post-processor)."""
        if self.bos_token is None:
            return None
        return self._specials.get(self.bos_token, self._added.get(self.bos_token))

    @property
    def chat_template(self) -> str:
        """A Jinja chat template, saved with the tokenizer; empty until post-training fills it."""
        return self._chat_template

    @chat_template.setter
    def chat_template(self, value: str) -> None:
        if not isinstance(value, str):
            raise InputError(f"chat_template must be a string, got {type(value).__name__}")
        self._chat_template = value

    @property
    def merges(self) -> list[tuple[int, int, int]]:
        """The merges in rank order, as (left id, right id, new id)."""
        return list(self._merges)

    @property
    def pattern_name(self) -> str:
        """ "gpt2", "gpt4" or "custom"."""
        return pattern_name(self.pattern)

    @property
    def content_hash(self) -> str:
        """sha256 (hex) of everything that decides ids: bytes, merges, specials, pattern, normalizer.

        Two models share a tokenizer exactly when their hashes match; the chat template is not included.
        """
        return content_hash(self._identity())

    def _identity(self) -> dict[str, Any]:
        data = identity(self._vocab, self.pattern, self.normalizer, self.ignore_merges)
        # Present only when used, so the hashes of tokenizers saved before these options stay the same.
        if self.pre_tokenizer is not None:
            data["pre_tokenizer"] = self.pre_tokenizer
        if self.normalized_tokens:
            data["normalized_tokens"] = sorted(self.normalized_tokens)
        if self.rank_by_token_id:
            data["rank_by_token_id"] = True
        return data

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, "
            f"specials={len(self._specials)}, pattern={self.pattern_name!r})"
        )

    def __getstate__(self) -> dict[str, Any]:  # picklable for worker processes: drop caches
        state = dict(self.__dict__)
        state["_cache"], state["_splitters"], state["_tiktoken"] = {}, {}, None
        state["_normalize"] = state["_pre_tokenize"] = None  # closures: rebuilt from their specs
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._normalize = compile_normalizer(self.normalizer)
        self._pre_tokenize = (
            compile_pre_tokenizer(self.pre_tokenizer)
            if self.pre_tokenizer is not None
            else partial(split_pieces, self._compiled)
        )

    # ----------------------------------------------------------------------------------------------
    # files and other libraries (see formats.py)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `lmstack_tokenizer.json`, and Hugging Face's `tokenizer.json` + `tokenizer_config.json`."""
        return formats.save(self, directory)

    @classmethod
    def from_tiktoken(
        cls,
        path: str | os.PathLike,
        *,
        name: str | None = None,
        pattern: str | None = None,
        special_tokens: Mapping[str, int] | None = None,
    ) -> Tokenizer:
        """Import a tiktoken rank file (`.tiktoken`: base64 token and rank per line), keeping its ids.

        `name` (r50k_base, p50k_base, cl100k_base, o200k_base) supplies the published split pattern
        and special tokens; `pattern` and `special_tokens` override them (one of `name`/`pattern` is
        needed: the file holds only the ranks).
        """
        return formats.from_tiktoken(cls, path, name=name, pattern=pattern, special_tokens=special_tokens)

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> Tokenizer:
        """Import GPT-2's original `encoder.json` + `vocab.bpe` (ids as in the files)."""
        return formats.from_gpt2_files(cls, encoder_json, vocab_bpe)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read `lmstack_tokenizer.json` from `directory`, or import a byte-level BPE `tokenizer.json`."""
        return formats.load(cls, directory)

    def to_hf(self) -> Any:
        """This tokenizer as a `tokenizers.Tokenizer` (needs the `tokenizers` package)."""
        return formats.to_hf(self)

    def to_tiktoken(self) -> Any:
        """This tokenizer as a `tiktoken.Encoding` built from our ranks (needs `tiktoken`)."""
        return formats.to_tiktoken(self)
