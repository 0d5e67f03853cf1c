"""Decoding a stream of generated tokens into text, one complete character at a time."""

from __future__ import annotations

import codecs

from lmstack.tokenizer.types import TokenizerLike


class StreamingDecoder:
    """Turns a stream of token ids into text, holding back bytes until a character is complete.

    A multi-byte character (an emoji is 4 bytes) is often split across tokens; decoding each token alone
    would print U+FFFD halves. `push(id)` returns the newly completed text (often ""), `flush()` returns
    what is left (an incomplete tail becomes U+FFFD) and resets. The concatenated output equals
    `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self._tokenizer.id_to_bytes(token_id))

    def flush(self) -> str:
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
