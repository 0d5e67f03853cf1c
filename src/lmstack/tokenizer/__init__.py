"""Byte-level BPE tokenizer: train on text, encode/decode, and move between lmstack, Hugging Face
`tokenizers` and tiktoken. Ids 0-255 are bytes, 256 + i is merge i, special tokens follow.

    from lmstack.tokenizer import Tokenizer
    tok = Tokenizer.train(["data/corpus.txt"], 8192, special_tokens=["<|endoftext|>"])
    ids = tok.encode("Hello world<|endoftext|>", allowed_special="all")
    tok.save("out/tokenizer")          # lmstack_tokenizer.json + tokenizer.json + tokenizer_config.json
"""

from lmstack.tokenizer.bpe import StreamingDecoder, Tokenizer
from lmstack.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN
from lmstack.tokenizer.stats import TokenizerStats, measure_file, measure_text

__all__ = [
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "StreamingDecoder",
    "Tokenizer",
    "TokenizerStats",
    "measure_file",
    "measure_text",
]
