"""How much text a token carries: the usual rules of thumb, measured.

Rules of thumb say "~4 characters per token" and "~1.3 tokens per word" for English with GPT-4's tokenizer,
and far fewer characters per token for code and non-Latin scripts. These numbers decide how many tokens a
corpus holds and how much text fits a context window, so we measure them for a given tokenizer and text.
Special-token strings in the text count as plain text (`encode_ordinary`).
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from lmstack.tokenizer.bpe import Tokenizer
from lmstack.tokenizer.pretokenize import READ_BLOCK_BYTES, iter_file_text, iter_pieces


@dataclass(frozen=True)
class TokenizerStats:
    """Counts for one text; words are whitespace-separated runs."""

    tokens: int
    characters: int
    bytes: int
    words: int

    @property
    def chars_per_token(self) -> float:
        return self.characters / max(self.tokens, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)

    @property
    def words_per_token(self) -> float:
        return self.words / max(self.tokens, 1)

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / max(self.words, 1)

    def to_dict(self) -> dict[str, float]:
        ratios = ("chars_per_token", "bytes_per_token", "words_per_token", "tokens_per_word")
        return {**asdict(self), **{name: round(getattr(self, name), 4) for name in ratios}}


def measure_text(tok: Tokenizer, text: str) -> TokenizerStats:
    """Token, character, byte and word counts of `text` under `tok`."""
    return TokenizerStats(
        len(tok.encode_ordinary(text)), len(text), len(text.encode("utf-8")), len(text.split())
    )


def measure_file(
    tok: Tokenizer, path: str | os.PathLike, *, block_bytes: int = READ_BLOCK_BYTES
) -> TokenizerStats:
    """`measure_text` for a UTF-8 file of any size, streamed in blocks (same counts as reading it whole).

    For a normalizing tokenizer (an imported Qwen2) each block is normalized on its own, so a combining
    sequence cut by a block boundary (one per MiB) may count differently from normalizing the whole text.
    """
    characters = n_bytes = words = 0
    ends_in_word = False

    def blocks() -> Iterator[str]:
        nonlocal characters, n_bytes, words, ends_in_word
        for block in iter_file_text(path, block_bytes):
            characters += len(block)
            n_bytes += len(block.encode("utf-8"))
            words += len(block.split())
            if ends_in_word and not block[0].isspace():  # a word cut by the block boundary counts once
                words -= 1
            ends_in_word = not block[-1].isspace()
            yield unicodedata.normalize(tok.normalizer, block) if tok.normalizer else block

    tokens = sum(len(tok._piece_ids(piece)) for piece in iter_pieces(blocks(), tok._compiled))
    return TokenizerStats(tokens, characters, n_bytes, words)
