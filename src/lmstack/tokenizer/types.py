"""`TokenizerLike`: the tokenizer as the file formats, the chat renderer and the streaming decoder see it.

Those modules sit below `bpe.Tokenizer`, which delegates to them, so they describe what they read
structurally instead of importing the class: `bpe` imports them, never the other way round. Functions
there that build a tokenizer take its class as an argument. The underscored fields are the vocabulary
tables (`vocab.Vocab`) the formats write out; they are internal to this package.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, TypeVar

from lmstack.tokenizer.vocab import Vocab


class TokenizerLike(Protocol):
    pattern: str
    normalizer: str | dict[str, Any] | None
    pre_tokenizer: dict[str, Any] | None
    normalized_tokens: tuple[str, ...]
    ignore_merges: bool
    rank_by_token_id: bool
    bos_token: str | None
    eos_token: str | None
    chat_template: str
    _vocab: Vocab
    _byte_ids: list[int]
    _merges: list[tuple[int, int, int]]
    _ranks: dict[tuple[int, int], tuple[int, int]]
    _id_bytes: list[bytes | None]
    _specials: dict[str, int]
    _added: dict[str, int]

    @property
    def vocab_size(self) -> int: ...

    @property
    def special_tokens(self) -> dict[str, int]: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int | None: ...

    @property
    def merges(self) -> list[tuple[int, int, int]]: ...

    @property
    def pattern_name(self) -> str: ...

    @property
    def content_hash(self) -> str: ...

    def encode(self, text: str, *, allowed_special: Iterable[str] | str = ...) -> list[int]: ...

    def decode_bytes(self, ids: Iterable[int]) -> bytes: ...

    def id_to_bytes(self, token_id: int) -> bytes: ...


T = TypeVar("T", bound=TokenizerLike)  # the tokenizer class a loader is asked to build
