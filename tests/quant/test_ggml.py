"""GGUF block formats against the `gguf` package and llama.cpp: quantisers bit-equal to `gguf`'s where it
has one (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), every dequantiser equal to its decoder, and every quantiser
bit-equal to llama.cpp's reference one (`ggml_quantize_chunk` in the libggml-base that llama-cpp-python
ships, called through ctypes), K-quants included. The llama.cpp tests skip when llama-cpp-python is not
installed, except under CI=true, where the test extra installs it and they must run."""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lmstack.errors import InputError
from lmstack.quant import GGML_BLOCKS, ggml_dequantize, ggml_quantize

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

T = gguf.GGMLQuantizationType


def _weights(rows: int = 24, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.2
    w[1, :64] = 0  # all-zero blocks
    w[2] = w[2].abs()  # all-positive blocks (the min is clamped to zero in K-quants)
    w[3, 5] = 3.0  # an outlier
    w[4, :32] = 0.5  # a constant block
    return w


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "F32", "BF16"])
def test_quantize_bit_equal_to_gguf(qtype):
    w = _weights()
    ours = ggml_quantize(w, qtype).numpy()
    ref = quantize(w.numpy(), T[qtype])
    assert np.array_equal(ours, ref.view(np.uint8).reshape(ours.shape))


@pytest.mark.parametrize("qtype", list(GGML_BLOCKS))
def test_dequantize_equal_to_gguf(qtype):
    w = _weights(seed=1)
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        data = ggml_quantize(w, qtype).numpy()
    else:
        data = quantize(w.numpy(), T[qtype]).view(np.uint8)
    ref = dequantize(data, T[qtype])
    ours = ggml_dequantize(torch.from_numpy(data.copy()), qtype, tuple(w.shape))
    assert np.array_equal(ours.numpy(), ref.reshape(w.shape))


@pytest.mark.parametrize(
    ("qtype", "rel_rmse"), [("Q4_K", 0.12), ("Q5_K", 0.06), ("Q6_K", 0.03), ("Q8_0", 0.01)]
)
def test_k_quant_error(qtype, rel_rmse):
    w = _weights(rows=32, seed=2)
    deq = ggml_dequantize(ggml_quantize(w, qtype), qtype, tuple(w.shape))
    assert ((deq - w).pow(2).mean().sqrt() / w.std()) < rel_rmse
    assert torch.equal(deq[1, :64], torch.zeros(64))
    # the K-quant search beats plain min/max rounding at the same bits (Q4_K vs Q4_1, Q5_K vs Q5_1)
    simple = {"Q4_K": "Q4_1", "Q5_K": "Q5_1"}.get(qtype)
    if simple:
        plain = ggml_dequantize(ggml_quantize(w, simple), simple, tuple(w.shape))
        assert (deq - w).pow(2).mean() < (plain - w).pow(2).mean()


def test_bad_widths_and_types_name_the_fix():
    with pytest.raises(InputError, match="multiple of 256"):
        ggml_quantize(torch.zeros(2, 320), "Q4_K")
    with pytest.raises(InputError, match="not supported"):
        ggml_quantize(torch.zeros(2, 256), "Q3_K")
    with pytest.raises(InputError, match="truncated"):
        ggml_dequantize(torch.zeros(100, dtype=torch.uint8), "Q8_0", (2, 64))


# ---- llama.cpp's reference quantiser -------------------------------------------------------------
GGML_TYPE_IDS = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}


@pytest.fixture(scope="module")
def ggml_lib():
    spec = importlib.util.find_spec("llama_cpp")
    libs = sorted((Path(spec.origin).parent / "lib").glob("libggml-base.so*")) if spec else []
    if not libs:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "llama.cpp's libggml-base is missing under CI — install the test extra (llama-cpp-python)"
            )
        pytest.skip(
            "llama.cpp's libggml-base is not installed — pip install llama-cpp-python to compare with it"
        )
    lib = ctypes.CDLL(str(libs[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    return lib


def _llama_cpp_quantize(lib, w: torch.Tensor, qtype: str) -> np.ndarray:
    x = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    rows, cols = x.shape
    block, nbytes = GGML_BLOCKS[qtype]
    out = np.zeros((rows, cols // block * nbytes), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(
        GGML_TYPE_IDS[qtype], x.ctypes.data, out.ctypes.data, 0, rows, cols, None
    )
    assert written == out.size
    return out


@pytest.mark.parametrize("qtype", list(GGML_TYPE_IDS))
@pytest.mark.parametrize("scale", [0.2, 30.0, 1e-3])
def test_quantize_bit_equal_to_llama_cpp(ggml_lib, qtype, scale):
    """Every block byte-for-byte, over random rows at three magnitudes plus zero, constant, all-positive
    and outlier blocks. The K-quants' search compares float32 sums, so this pins its arithmetic: summing
    in another order, or a square root off by one ulp, changed the bytes of about half the Q4_K blocks."""
    g = torch.Generator().manual_seed(4)
    w = torch.cat([_weights(rows=64, cols=1024, seed=3), torch.randn(192, 1024, generator=g)]) * scale
    ours = ggml_quantize(w, qtype).numpy()
    ref = _llama_cpp_quantize(ggml_lib, w, qtype)
    nbytes = GGML_BLOCKS[qtype][1]
    differ = (ours.reshape(-1, nbytes) != ref.reshape(-1, nbytes)).any(1)
    assert not differ.any(), f"{qtype}: {int(differ.sum())} of {differ.size} blocks differ"
