"""The device paths of QuantLinear: PyTorch's CUDA int4 kernel behind its first-use check, and int8 with
the scale applied to the output.

This machine has no GPU, so the check and its fallback are tested on CPU with stand-ins for PyTorch's
two CUDA ops: one that follows the kernel's documented contract (codes two a byte with the even input
in the high nibble, w = (q − 8)·s + m with [s, m] stored (in/g, out, 2)) — so our conversion to that
layout is what is checked — one that returns wrong values, and one that raises. The real kernel is
tested where a GPU is present.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.compress import QuantLinear, QuantScheme, cuda
from lmstack.compress import linear as linear_module
from lmstack.quant.integer import int4_unpack


def _layer(
    method: str, group_size: int | None, out_features: int = 48, in_features: int = 256
) -> QuantLinear:
    torch.manual_seed(0)
    lin = nn.Linear(in_features, out_features, bias=True)
    nn.init.normal_(lin.weight, std=0.2)
    nn.init.normal_(lin.bias, std=0.2)
    return QuantLinear.from_linear(lin, QuantScheme.make(method, group_size))


def _fake_pack(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    assert codes.dtype == torch.uint8 and inner_k_tiles in (2, 4, 8)
    assert codes.shape[1] * 2 % (16 * inner_k_tiles) == 0
    return codes.clone()  # a stand-in keeps the bytes; the matmul below reads them as the kernel does


def _fake_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor):
    """The kernel's contract: even input in the high nibble, w = (q − 8)·s + m per group."""
    assert x.dtype == torch.bfloat16 and scales_and_zeros.dtype == torch.bfloat16
    q = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(packed.shape[0], -1).float()
    s = scales_and_zeros[..., 0].float().t().repeat_interleave(group_size, 1)  # (out, in)
    m = scales_and_zeros[..., 1].float().t().repeat_interleave(group_size, 1)
    return (x.float() @ ((q - 8) * s + m).t()).to(torch.bfloat16)


@pytest.fixture
def cpu_as_device(monkeypatch):
    """CPU takes the device path: our CPU kernels and PyTorch's CPU ones off (as on a GPU), CPU listed
    as an int4 device."""
    monkeypatch.setattr("lmstack.compress.kernels.available", lambda: False)
    monkeypatch.setattr(QuantLinear, "_uses_packed_kernel", lambda self, x, any_width=False: False)
    monkeypatch.setattr(linear_module, "DEVICE_INT4", ("cpu",))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_a_kernel_that_keeps_its_contract_is_used(cpu_as_device, monkeypatch, group_size):
    monkeypatch.setattr(cuda, "ops", lambda: (_fake_pack, _fake_mm))
    q = _layer("int4", group_size)
    x = torch.randn(3, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        with torch.no_grad():
            y = q(x)
    assert isinstance(q._device_int4, cuda.DeviceInt4)
    ref = q.reference_forward(x)
    assert (y - ref).norm() <= 2**-6 * ref.norm()  # bfloat16 activations and scales
    # exactly the stand-in's product on our conversion, plus the bias
    expected = _fake_mm(x.bfloat16(), q._device_int4.weight, group_size, q._device_int4.scales_and_zeros)
    assert torch.equal(y, expected.float() + q.bias)


def _unswapped_pack(codes: torch.Tensor, tiles: int) -> torch.Tensor:
    """Codes two a byte the wrong way round (even input low, as ours are stored): undoes our swap, so
    the stand-in kernel reads our order — the check must catch a layout conversion that is wrong."""
    return ((codes & 0x0F) << 4) | (codes >> 4)


def _raising_mm(x, packed, group_size, scales_and_zeros):
    raise RuntimeError("no kernel image")


def _raising_pack(codes, tiles):
    raise RuntimeError("_convert_weight_to_int4pack is not implemented for this device")


@pytest.mark.parametrize(
    "pack,mm,message",
    [
        (_fake_pack, lambda x, w, g, sz: 1.5 * _fake_mm(x, w, g, sz), "differs from dequantise-then-multiply"),
        (_fake_pack, lambda x, w, g, sz: torch.full_like(_fake_mm(x, w, g, sz), float("nan")), "differs"),
        (_fake_pack, _raising_mm, r"failed \(RuntimeError: no kernel image\)"),
        (_raising_pack, _fake_mm, "failed .RuntimeError: _convert_weight_to_int4pack"),
        (_unswapped_pack, _fake_mm, "differs from dequantise-then-multiply"),
    ],
    ids=["wrong-values", "nan", "mm-raises", "pack-raises", "wrong-layout"],
)  # fmt: skip
def test_a_failing_kernel_falls_back_with_one_warning(cpu_as_device, monkeypatch, pack, mm, message):
    monkeypatch.setattr(cuda, "ops", lambda: (pack, mm))
    q = _layer("int4", 64)
    x = torch.randn(2, 256)
    with pytest.warns(RuntimeWarning, match=message):
        with torch.no_grad():
            y = q(x)
    assert q._device_int4 is False
    assert torch.equal(y, q.reference_forward(x))  # dequantise, then multiply
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once per layer: no second warning
        with torch.no_grad():
            assert torch.equal(q(x), y)


def test_the_check_is_redone_after_a_move(cpu_as_device, monkeypatch):
    monkeypatch.setattr(cuda, "ops", lambda: (_fake_pack, _fake_mm))
    q = _layer("int4", 32)
    with torch.no_grad():
        q(torch.randn(1, 256))
        assert isinstance(q._device_int4, cuda.DeviceInt4)
        q.to(torch.float32)
        assert q._device_int4 is None


def test_scales_and_zeros_reproduce_our_weights():
    q = _layer("int4", 32)
    sz = cuda.int4_scales_and_zeros(q.scales, q.zeros).float()
    codes = int4_unpack(q.qweight).float()
    s = sz[..., 0].t().repeat_interleave(32, 1)
    m = sz[..., 1].t().repeat_interleave(32, 1)
    w = q.dequantize()
    assert ((codes - 8) * s + m - w).abs().max() <= 2**-7 * w.abs().max()  # bfloat16 rounding of s, m


def test_int8_output_scaling_equals_dequantize_then_matmul_with_gradients(monkeypatch):
    """Where neither kernel runs (here: gradients with respect to x), int8 multiplies by q and scales
    the output: the same product, and the same gradient, as multiplying by the dequantised matrix."""
    q = _layer("int8", None)
    x = torch.randn(5, 256, requires_grad=True)
    y = q(x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = F.linear(x_ref, q.dequantize(), q.bias)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_int4_kernel_matches_the_reference(group_size, dtype):
    q = _layer("int4", group_size, out_features=64, in_features=512).to("cuda")
    x = torch.randn(3, 512, device="cuda", dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            y = q(x)
    assert isinstance(q._device_int4, cuda.DeviceInt4)  # the real kernel passed its check
    ref = F.linear(x.float(), q.dequantize(torch.float32), q.bias.float())
    assert y.dtype == dtype and (y.float() - ref).norm() <= 2**-5 * ref.norm()


@needs_cuda
def test_cuda_int8_scales_the_output():
    q = _layer("int8", None).to("cuda")
    x = torch.randn(4, 256, device="cuda")
    with torch.no_grad():
        y = q(x)
        ref = F.linear(x, q.dequantize(), q.bias)
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4)
