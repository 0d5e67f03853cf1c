"""Pure quantize/dequantize functions: torch tensors in, torch tensors out, vectorised over blocks.

`integer`  int8 per-output-channel symmetric, int4 group-wise asymmetric (the weight-only schemes)
`nf4`      NormalFloat4 with double quantisation of its block constants (QLoRA, Dettmers et al. 2023)
`ggml`     the block formats of GGUF files (Q8_0, Q4_0, ..., Q4_K, Q6_K) as raw bytes, llama.cpp's layout
"""

from lmstack.quant.ggml import GGML_BLOCKS, ggml_dequantize, ggml_quantize
from lmstack.quant.integer import (
    Int4Tensor,
    Int8Tensor,
    int4_dequantize,
    int4_quantize,
    int8_dequantize,
    int8_quantize,
)
from lmstack.quant.nf4 import NF4_CODE, NF4Tensor, nf4_dequantize, nf4_quantize

__all__ = [
    "GGML_BLOCKS",
    "NF4_CODE",
    "Int4Tensor",
    "Int8Tensor",
    "NF4Tensor",
    "ggml_dequantize",
    "ggml_quantize",
    "int4_dequantize",
    "int4_quantize",
    "int8_dequantize",
    "int8_quantize",
    "nf4_dequantize",
    "nf4_quantize",
]
