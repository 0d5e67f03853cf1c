"""Weight-only quantized linears: `QuantLinear`, one layer's quantized matrix and its products.

A `QuantLinear` stores its matrix in one of three forms (buffers, saved as `<linear>.qweight` etc.):

  int8   qweight (out, in) int8, scales (out,): w = q · s, one scale per output channel
  int4   qweight (out, in/2) uint8 (two codes a byte), scales and zeros (out, in/g): w = (q − z) · s
  nf4    qweight (out·in/2,) uint8 NF4 codes, scales = the per-64 absmax, 8-bit coded (double
         quantisation) with absmax_scale (per 256) and absmax_offset (QLoRA, Dettmers et al. 2023)

and computes `x @ Wᵀ + b`. Decoding one token is a matrix-vector product whose time is the time to
read the weights, so fewer bytes per weight is the speedup — provided the matmul reads the integers
directly instead of first writing a float copy. On CPU, products run through our own kernels
(`lmstack.compress.kernels`, compiled on first use: a layout repacked for streaming; int8 and int4 on
int8-rounded activations as llama.cpp does); `compress.decode` fuses the projections that read one
input and gives the float head a bfloat16 copy. Our kernels take prefill too: on the machine this was measured on they beat
PyTorch's packed kernels at every batch size tried (1.3-2x at 9 to 1024 rows). The repacked copy is
built on first use and then is the only copy: the saved buffers are let go and rebuilt exactly from
it when read (state dict, `dequantize`, attribute access), so a decoding model holds its integer
weights once. Where our kernels cannot be built, PyTorch's packed weight-only kernels run
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, as gpt-fast does), with activations cast to
bfloat16 around the call: those kernels are several times slower on float32 inputs. Everything else
(NF4, CUDA, a shape PyTorch's int4 kernel refuses, a call that needs gradients with
respect to x) dequantises the matrix and multiplies: correct everywhere, fast nowhere.

Which of a model's linears become QuantLinears, and the record that lets a checkpoint load back, is
`compress.swap`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.compress import cuda, kernels
from lmstack.errors import InputError
from lmstack.quant import (
    Int4Tensor,
    Int8Tensor,
    NF4Tensor,
    int4_dequantize,
    int4_quantize,
    int8_dequantize,
    int8_quantize,
    nf4_dequantize,
    nf4_quantize,
)
from lmstack.quant.integer import INT4_GROUP_SIZES, int4_unpack
from lmstack.quant.nf4 import NF4_CODE, nf4_absmax

METHODS = ("int8", "int4", "nf4")
BITS = {"int8": 8, "int4": 4, "nf4": 4}
DEFAULT_GROUP_SIZE = {"int8": None, "int4": 128, "nf4": 64}
# every tensor a QuantLinear may save besides its bias (the weight maps name them after the linear)
QUANT_TENSORS = ("qweight", "scales", "zeros", "absmax_scale", "absmax_offset")
_NF4_DOUBLE_BLOCK = 256
# devices whose int4 products go through PyTorch's packed int4 kernel (`compress.cuda`, self-checked)
DEVICE_INT4 = ("cuda",)
# byte -> its two NF4 values, high nibble first (the packing of lmstack.quant.nf4)
_NF4_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=-1)


@dataclass(frozen=True)
class QuantScheme:
    """How to quantize: `method` (int8, int4, nf4) and, for int4 and nf4, the group (block) size."""

    method: str
    group_size: int | None = None

    @property
    def bits(self) -> int:
        return BITS[self.method]

    @classmethod
    def make(cls, method: str, group_size: int | None = None) -> QuantScheme:
        """Validate a user's choice; `group_size=None` takes the method's default."""
        if method not in METHODS:
            raise InputError(f"unknown quantization method {method!r} — use one of {', '.join(METHODS)}")
        if method == "int8":
            if group_size is not None:
                raise InputError(
                    "int8 uses one scale per output channel, not groups — drop the group size (--group-size)"
                )
            return cls(method)
        group_size = DEFAULT_GROUP_SIZE[method] if group_size is None else group_size
        if method == "int4" and group_size not in INT4_GROUP_SIZES:
            raise InputError(
                f"int4 group size {group_size} is not supported — use one of {', '.join(map(str, INT4_GROUP_SIZES))}"
            )
        if method == "nf4" and (group_size <= 0 or group_size % 2):
            raise InputError(f"NF4 block size must be a positive even number, got {group_size} — use 64")
        return cls(method, group_size)


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized; same call as `nn.Linear`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        *,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        for name, (shape, buf_dtype) in _buffer_specs(in_features, out_features, scheme, dtype).items():
            self.register_buffer(name, torch.zeros(shape, dtype=buf_dtype, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        # PyTorch's CPU kernel's layout and our kernels', each built on first use
        self._packed: tuple[torch.Tensor, ...] | None = None
        self._own: kernels.PackedInt8 | kernels.PackedInt4 | None = None
        self._generation = 0  # bumped whenever the tensors are replaced (new device, dtype or state dict)
        self._own_stamp: tuple | None = None
        # buffers held only in `_own` (their names -> dtypes), rebuilt exactly when asked for
        self._released: dict[str, torch.dtype] = {}
        # PyTorch's CUDA int4 layout: None until first use, False when its check failed
        self._device_int4: cuda.DeviceInt4 | bool | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme) -> QuantLinear:
        """Quantize a float `nn.Linear`'s weight; the bias is kept in float."""
        w = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            scheme,
            bias=linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        for name, tensor in _quantize(w, scheme).items():
            getattr(module, name).copy_(tensor)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def extra_repr(self) -> str:
        g = f", group_size={self.scheme.group_size}" if self.scheme.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.method}{g}"

    # ---- the reference: dequantise, then multiply ------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float matrix (out, in) this module stands for."""
        shape = (self.out_features, self.in_features)
        s = self.scheme
        if s.method in ("int8", "int4"):
            b = self._tensors()  # read from the packed copy when that is the only one, without keeping it
            dtype = dtype or b["scales"].dtype
            if s.method == "int8":
                return int8_dequantize(Int8Tensor(b["qweight"], b["scales"].float()), dtype)
            t = Int4Tensor(b["qweight"], b["scales"].float(), b["zeros"], s.group_size, shape)
            return int4_dequantize(t, dtype)
        dtype = dtype or self.absmax_scale.dtype
        t = NF4Tensor(
            self.qweight,
            self.scales,
            shape,
            s.group_size,
            self.absmax_scale.float(),
            float(self.absmax_offset),
            _NF4_DOUBLE_BLOCK,
        )
        if (self.in_features * self.out_features) % s.group_size:
            return nf4_dequantize(t, dtype)
        # one table lookup per byte (both codes at once) and a broadcast multiply by the block's absmax:
        # the same values as nf4_dequantize, ~5x faster, which is what an NF4 decode step spends its time on
        pairs = _NF4_PAIRS.to(self.qweight.device).index_select(0, self.qweight.int())  # (numel/2, 2)
        w = pairs.reshape(-1, s.group_size) * nf4_absmax(t)[:, None]
        return w.reshape(shape).to(dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # ---- the fast path ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._uses_own_kernel(x):
            return packed_matmul(x, self._own_weights(), self.bias)
        if self._uses_device_int4(x) and (packed_int4 := self._device_int4_weights()) is not None:
            y = cuda.int4_matmul(x, packed_int4)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        if not self._uses_packed_kernel(x):
            if self.scheme.method == "int8" and x.is_floating_point():
                return self._int8_scaled_output(x)
            return self.reference_forward(x)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        packed = self._packed_weights()
        if self.scheme.method == "int8":
            y = torch.ops.aten._weight_int8pack_mm(rows, packed[0], packed[1])
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed[0], self.scheme.group_size, packed[1])
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _uses_packed_kernel(self, x: torch.Tensor, *, any_width: bool = False) -> bool:
        if x.device.type != "cpu" or self.scheme.method == "nf4" or not x.is_floating_point():
            return False
        if torch.is_grad_enabled() and x.requires_grad:  # the packed kernels have no backward
            return False
        # PyTorch's int4 packing kernel tiles the output dimension by 16 (ours takes any width)
        return any_width or self.scheme.method == "int8" or self.out_features % 16 == 0

    def _int8_scaled_output(self, x: torch.Tensor) -> torch.Tensor:
        """int8 on any device: (x @ qᵀ) · s, the scale applied to the output (one row of scales per
        output channel commutes with the sum), so the only matrix written is q in x's dtype — not a
        dequantised matrix and the product that makes it. Gradients flow to x."""
        b = self._tensors()
        y = F.linear(x, b["qweight"].to(x.dtype)) * b["scales"].to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _uses_device_int4(self, x: torch.Tensor) -> bool:
        return (
            x.device.type in DEVICE_INT4
            and self.scheme.method == "int4"
            and x.is_floating_point()
            and not (torch.is_grad_enabled() and x.requires_grad)  # the kernel has no backward
        )

    def _device_int4_weights(self) -> cuda.DeviceInt4 | None:
        """PyTorch's CUDA int4 layout, built and checked once per layer (None: the check failed)."""
        if self._device_int4 is None:
            b = self._tensors()
            packed = cuda.checked_pack(
                b["qweight"], b["scales"], b["zeros"], self.scheme.group_size,
                lambda probe: F.linear(probe, self.dequantize(torch.float32)),
            )  # fmt: skip
            self._device_int4 = packed if packed is not None else False
        return self._device_int4 or None

    def _uses_own_kernel(self, x: torch.Tensor) -> bool:
        return self._uses_packed_kernel(x, any_width=True) and kernels.available()

    def _own_weights(self) -> kernels.PackedInt8 | kernels.PackedInt4:
        """Our kernel's copy, built on first use and rebuilt when the buffers change (as the fused
        products are); then the buffers it reproduces exactly are let go (`_release`)."""
        if self._own is None or self._own_stamp != self._stamp():
            self._restore()
            self._own = _own_pack(self.scheme, self.qweight, self.scales, getattr(self, "zeros", None))
            self._release()
        elif not self._released:  # put back by an access from outside, unchanged since
            self._release()
        return self._own

    # ---- one copy of the integer weights -----------------------------------------------------------
    # Once our kernel's copy exists the saved buffers are dropped and rebuilt from it on demand (it
    # holds the same integers, interleaved): a decoding model keeps its weights once, not twice.
    # Internal readers (`dequantize`, the state dict) rebuild them for the moment; an access from
    # outside (`layer.qweight`, which may write to it) puts them back for good, and the next kernel
    # call, seeing them, checks them (`_stamp`) and lets them go again.
    def _release(self) -> None:
        assert self._own is not None
        names = ["qweight", "scales", "zeros"] if self.scheme.method == "int4" else ["qweight", "scales"]
        if self.scheme.method == "int4":  # the kernel keeps scales as bfloat16: exact for int4_quantize's
            scales = self._buffers["scales"]
            if not torch.equal(scales.to(torch.bfloat16).to(scales.dtype), scales):
                names.remove("scales")
        for name in names:
            self._released[name] = self._buffers.pop(name).dtype
        self._own_stamp = self._stamp()

    def _rebuilt(self) -> dict[str, torch.Tensor]:
        """The released buffers, rebuilt exactly from our kernel's copy."""
        assert self._own is not None
        # new tensors, not inference tensors, even where the copy was packed under inference_mode:
        # buffers must keep version counters (`_stamp`)
        with torch.inference_mode(False):
            if isinstance(self._own, kernels.PackedInt8):
                values = dict(zip(("qweight", "scales"), kernels.unpack_int8(self._own)))
            else:
                values = dict(zip(("qweight", "scales", "zeros"), kernels.unpack_int4(self._own)))
            return {name: values[name].to(dtype, copy=True) for name, dtype in self._released.items()}

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every quantized tensor of the layer, by buffer name, without putting released ones back."""
        return {**self._buffers, **(self._rebuilt() if self._released else {})}

    def _restore(self) -> None:
        if self._released:
            rebuilt = self._rebuilt()
            order = [n for n in QUANT_TENSORS if n in rebuilt or n in self._buffers]
            held = {**self._buffers, **rebuilt}
            self._buffers.clear()
            self._buffers.update({n: held[n] for n in order})
            self._released = {}
            self._own_stamp = self._stamp()  # the copy still matches the buffers

    def __getattr__(self, name: str) -> Any:
        if name in self.__dict__.get("_released", ()):
            self._restore()
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("_released", ()):
            self._restore()
        super().__setattr__(name, value)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._released:
            rebuilt = self._rebuilt()
            for name in QUANT_TENSORS:
                if name in rebuilt:
                    destination[prefix + name] = rebuilt[name]

    def _packed_weights(self) -> tuple[torch.Tensor, ...]:
        if self._packed is None:
            if self.scheme.method == "int8":
                # the int8 kernel assumes its weight 64-byte aligned and crashes on batches of 4+ rows
                # otherwise; tensors read from a safetensors file sit at arbitrary offsets
                if self.qweight.data_ptr() % 64:
                    self.qweight = self.qweight.clone()
                self._packed = (self.qweight, self.scales.to(torch.bfloat16))
            else:
                self._packed = int4_to_cpu_kernel_layout(self.qweight, self.scales, self.zeros)
        return self._packed

    def _apply(self, fn, recurse: bool = True):
        self._restore()
        self._packed = self._own = self._device_int4 = None  # a new device or dtype: repack on next use
        self._generation += 1
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._restore()
        self._packed = self._own = self._device_int4 = None
        self._generation += 1
        super()._load_from_state_dict(*args, **kwargs)

    def _stamp(self) -> tuple[int, ...]:
        """Changes when the tensors do: replaced (`_generation`, the objects' ids) or written in place
        (their version counters). Cheap enough to check on every decode call."""
        tensors = [*self._buffers.values(), self._parameters.get("bias")]
        return (
            self._generation,
            len(self._released),
            *[(id(t), t._version) if t is not None else None for t in tensors],
        )


def _own_pack(
    scheme: QuantScheme, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
) -> kernels.PackedInt8 | kernels.PackedInt4:
    if scheme.method == "int8":
        return kernels.pack_int8(qweight, scales)
    assert zeros is not None and scheme.group_size is not None
    return kernels.pack_int4(qweight, scales, zeros, scheme.group_size)


def packed_matmul(
    x: torch.Tensor, packed: kernels.PackedInt8 | kernels.PackedInt4, bias: torch.Tensor | None
) -> torch.Tensor:
    """`x @ Wᵀ + b` by our kernel from a packed int8/int4 matrix, in x's dtype."""
    if isinstance(packed, kernels.PackedInt8):
        y = kernels.int8_matmul(x, packed, bias)
    else:
        y = kernels.int4_matmul(x, packed, bias)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def int4_to_cpu_kernel_layout(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our asymmetric int4 (codes q in [0, 15], w = (q − z)·s) in the layout of PyTorch's CPU kernel,
    which computes w = (q − 8)·s + m with a float offset m per group (`cuda.int4_scales_and_zeros`).
    Returns the kernel's packed weight and scales_and_zeros (in/g, out, 2) in bfloat16."""
    codes = int4_unpack(packed).to(torch.int32)  # (out, in)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    return weight, cuda.int4_scales_and_zeros(scales, zeros)


def _buffer_specs(
    in_features: int, out_features: int, scheme: QuantScheme, dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of a QuantLinear's buffers: what the loader checks a checkpoint against."""
    if scheme.method == "int8":
        return {"qweight": ((out_features, in_features), torch.int8), "scales": ((out_features,), dtype)}
    g = scheme.group_size
    assert g is not None
    if scheme.method == "int4":
        groups = (out_features, in_features // g)
        return {
            "qweight": ((out_features, in_features // 2), torch.uint8),
            "scales": (groups, dtype),
            "zeros": (groups, torch.uint8),
        }
    numel = in_features * out_features
    blocks = -(-numel // g)
    return {
        "qweight": ((-(-numel // 2),), torch.uint8),
        "scales": ((blocks,), torch.uint8),
        "absmax_scale": ((-(-blocks // _NF4_DOUBLE_BLOCK),), dtype),
        "absmax_offset": ((1,), dtype),
    }


def _quantize(w: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    if scheme.method == "int8":
        t8 = int8_quantize(w)
        return {"qweight": t8.q, "scales": t8.scale}
    if scheme.method == "int4":
        t4 = int4_quantize(w, scheme.group_size)
        return {"qweight": t4.packed, "scales": t4.scale, "zeros": t4.zero}
    t = nf4_quantize(w, block=scheme.group_size, double_quant=True)
    assert t.absmax_scale is not None and t.double_block == _NF4_DOUBLE_BLOCK
    return {
        "qweight": t.packed,
        "scales": t.absmax,
        "absmax_scale": t.absmax_scale,
        "absmax_offset": torch.tensor([t.offset]),
    }
