"""Weight-only quantized linears: `QuantLinear`, `swap(model, scheme)` and the record in config.json.

A `QuantLinear` stores its matrix in one of three forms (buffers, saved as `<linear>.qweight` etc.):

  int8   qweight (out, in) int8, scales (out,): w = q · s, one scale per output channel
  int4   qweight (out, in/2) uint8 (two codes a byte), scales and zeros (out, in/g): w = (q − z) · s
  nf4    qweight (out·in/2,) uint8 NF4 codes, scales = the per-64 absmax, 8-bit coded (double
         quantisation) with absmax_scale (per 256) and absmax_offset (QLoRA, Dettmers et al. 2023)

and computes `x @ Wᵀ + b`. Decoding one token is a matrix-vector product whose time is the time to
read the weights, so fewer bytes per weight is the speedup — provided the matmul reads the integers
directly instead of first writing a float copy. On CPU, products run through our own kernels
(`lmstack.compress.kernels`, compiled on first use: a layout repacked for streaming; int8 and int4 on
int8-rounded activations as llama.cpp does), the projections that read one input fused
(`FusedQuant`: q, k, v; gate, up), and a decode-sized batch of the float head through a bfloat16 copy
(`DecodeHead`). Our kernels take prefill too: on the machine this was measured on they beat
PyTorch's packed kernels at every batch size tried (1.3-2x at 9 to 1024 rows). The repacked copy is
built on first use and then is the only copy: the saved buffers are let go and rebuilt exactly from
it when read (state dict, `dequantize`, attribute access), so a decoding model holds its integer
weights once. Where our kernels cannot be built, PyTorch's packed weight-only kernels run
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, as gpt-fast does), with activations cast to
bfloat16 around the call: those kernels are several times slower on float32 inputs. Everything else
(NF4, CUDA, a shape PyTorch's int4 kernel refuses, a call that needs gradients with
respect to x) dequantises the matrix and multiplies: correct everywhere, fast nowhere.

The scheme is a property of the checkpoint, not of its file name: `quantization_config(model)` is
what `save_pretrained` writes into config.json, and `prepare_quantized(model, config)` rebuilds the
empty quantized modules on a meta-built model so the loader can assign the saved tensors to them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.compress import cuda, kernels
from lmstack.errors import InputError
from lmstack.model.attention import Attention
from lmstack.model.mlp import MLP
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

QUANT_METHOD = "lmstack"  # the `quant_method` of config.json's quantization_config
METHODS = ("int8", "int4", "nf4")
BITS = {"int8": 8, "int4": 4, "nf4": 4}
DEFAULT_GROUP_SIZE = {"int8": None, "int4": 128, "nf4": 64}
# every tensor a QuantLinear may save besides its bias (the weight maps name them after the linear)
QUANT_TENSORS = ("qweight", "scales", "zeros", "absmax_scale", "absmax_offset")
# the projections a quantizer targets; embeddings, norms, MoE routers and (by default) the head stay float
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
_NF4_DOUBLE_BLOCK = 256
# rows (tokens) up to which the float head multiplies by its bfloat16 copy; past a few rows the
# float32 weight and PyTorch's tiled matmul win
SMALL_BATCH = 8
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
            return _own_matmul(x, self._own_weights(), self.bias)
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


def _own_matmul(
    x: torch.Tensor, packed: kernels.PackedInt8 | kernels.PackedInt4, bias: torch.Tensor | None
) -> torch.Tensor:
    if isinstance(packed, kernels.PackedInt8):
        y = kernels.int8_matmul(x, packed, bias)
    else:
        y = kernels.int4_matmul(x, packed, bias)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


class FusedQuant:
    """QuantLinears that read the same input — attention's q, k, v; a gated MLP's gate and up —
    multiplied by our kernel as one matrix, their rows stacked: one call and one pass over the
    weights instead of two or three (a deep, thin model's decode step is mostly such small calls).
    The modules stay in place; the owner asks `serves(...)` with its current modules, so replacing
    one (a LoRA wrapper) turns the fused product off. Batches our kernels do not take run the
    modules one by one. The stack is built on first use from the modules' packed copies, which then
    become views into it (the weights stay resident once), and is rebuilt when a module's tensors
    change: replaced, or their codes or scales written in place."""

    def __init__(self, modules: tuple[QuantLinear, ...]):
        self.modules = modules
        self._packed: tuple[tuple, kernels.PackedInt8 | kernels.PackedInt4, torch.Tensor | None] | None = None

    @classmethod
    def of(cls, *modules: nn.Module | None) -> FusedQuant | None:
        """A fused product of `modules`, or None where they are not int8/int4 QuantLinears of one scheme."""
        if not all(isinstance(m, QuantLinear) for m in modules):
            return None
        first = modules[0]
        if first.scheme.method not in ("int8", "int4") or any(
            m.scheme != first.scheme or m.in_features != first.in_features for m in modules
        ):
            return None
        if any(m.out_features % kernels.ROWS for m in modules[:-1]):  # the stack would pad mid-way
            return None
        return cls(modules)

    def serves(self, *modules: nn.Module) -> bool:
        return len(modules) == len(self.modules) and all(a is b for a, b in zip(modules, self.modules))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.modules[0]._uses_own_kernel(x):
            return torch.cat([m(x) for m in self.modules], dim=-1)
        packs = [m._own_weights() for m in self.modules]
        key = tuple(m._own_stamp for m in self.modules)  # each module's stamp, just checked
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, *self._stack(packs))
        return _own_matmul(x, self._packed[1], self._packed[2])

    def _stack(
        self, packs: list[kernels.PackedInt8 | kernels.PackedInt4]
    ) -> tuple[kernels.PackedInt8 | kernels.PackedInt4, torch.Tensor | None]:
        """The modules' packed copies concatenated (blocks of rows are independent, and every module
        but the last has whole blocks), each module's copy then a view into the stack: one copy."""
        stacked, views = kernels.concat(packs)
        for m, view in zip(self.modules, views):
            m._own = view
        ms = self.modules
        if all(m.bias is None for m in ms):
            return stacked, None
        bias = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in ms]
        return stacked, torch.cat([b.detach().float() for b in bias])


def fuse_quantized(model: nn.Module) -> int:
    """Give every attention whose q, k, v (and every gated MLP whose gate, up) are int8/int4
    QuantLinears a `FusedQuant` of them; returns how many were fused."""
    fused = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_qkv = FusedQuant.of(module.q, module.k, module.v) or module.fused_qkv
            fused += isinstance(module.fused_qkv, FusedQuant)
        elif isinstance(module, MLP) and module.gate is not None:
            module.fused_gate_up = FusedQuant.of(module.gate, module.up)
            fused += module.fused_gate_up is not None
    return fused


class DecodeHead(nn.Linear):
    """The float LM head of a quantized model (the head the quantizer leaves in 16/32-bit): the same
    `nn.Linear` — same parameters, tied to the embedding or not, same state dict — that multiplies a
    decode-sized batch on CPU by a bfloat16 copy of its weight with our kernel (float32 activations
    and sums). A tied head of a small model is the largest matrix a decode step reads (GPT-2's is
    154 MB in float32 against 85 MB for all its int8 blocks); at 16 bits it costs half. The copy
    (half the head's size, built on first use, never saved) is rebuilt when the weight changes;
    larger batches, gradients and other devices use the float32 weight."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._copy: tuple[tuple[int, int], kernels.PackedBF16] | None = None  # (weight's identity, copy)

    @classmethod
    def wrap(cls, linear: nn.Linear) -> DecodeHead:
        """A DecodeHead holding `linear`'s own parameters (nothing is copied or allocated)."""
        head = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        head.weight = linear.weight
        head.bias = linear.bias
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            x.device.type != "cpu"
            or w.device.type != "cpu"
            or x.numel() > SMALL_BATCH * self.in_features
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            or not kernels.available()
        ):
            return super().forward(x)
        key = (w.data_ptr(), w._version)
        if self._copy is None or self._copy[0] != key:
            self._copy = (key, kernels.pack_bf16(w))
        return kernels.bf16_matmul(x, self._copy[1], self.bias).to(x.dtype)


def use_decode_head(model: nn.Module) -> None:
    """Make a quantized model's float `lm_head` a `DecodeHead` (no-op without a plain linear head)."""
    head = getattr(model, "lm_head", None)
    if type(head) is nn.Linear:
        model.lm_head = DecodeHead.wrap(head)


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


# ---- swapping modules ---------------------------------------------------------------------------
def target_linears(model: nn.Module, *, include_head: bool = False) -> Iterator[tuple[str, nn.Linear]]:
    """(name, module) of every projection a quantizer replaces, in model order."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (leaf in TARGETS and name.startswith("blocks.")) or (include_head and name == "lm_head"):
            yield name, module


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def swap(
    model: nn.Module,
    scheme: QuantScheme,
    *,
    include_head: bool = False,
    head_scheme: QuantScheme | None = None,
) -> nn.Module:
    """Replace the model's projections by `QuantLinear`s of `scheme`, in place; returns the model.

    With `include_head`, the LM head is quantized too. A head tied to the token embedding is
    quantized from the shared matrix and the tie ends: the embedding lookup keeps the float matrix
    (a lookup reads one row, so its bytes do not matter), the logits come from the quantized copy —
    what llama.cpp's Q8_0/Q4_0 files do with a tied `token_embd`, and on a small model with a large
    vocabulary the head is the largest matrix a decode step reads. The checkpoint then holds both.
    `head_scheme` quantizes the head differently from the blocks (default: `scheme`).

    Every module is checked before any is replaced, so a refused call leaves the model as it was."""
    if is_quantized(model):
        method = next(m.scheme.method for m in model.modules() if isinstance(m, QuantLinear))
        raise InputError(f"the model is already quantized ({method}) — quantize its float checkpoint instead")
    targets = [
        (name, linear, head_scheme if name == "lm_head" and head_scheme is not None else scheme)
        for name, linear in target_linears(model, include_head=include_head)
    ]
    for name, linear, s in targets:
        if s.method == "int4" and linear.in_features % s.group_size:
            fits = [g for g in INT4_GROUP_SIZES if linear.in_features % g == 0]
            fix = f"use --group-size {fits[-1]}" if fits else "use int8 or nf4"
            raise InputError(
                f"int4 group size {s.group_size} does not divide the input width "
                f"{linear.in_features} of {name} — {fix}"
            )
    for name, linear, s in targets:
        _replace(model, name, QuantLinear.from_linear(linear, s))
    use_decode_head(model)
    fuse_quantized(model)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


# ---- the record in config.json --------------------------------------------------------------------
def quantization_config(model: nn.Module) -> dict[str, Any] | None:
    """config.json's `quantization_config` for a quantized model (None for a float one)."""
    quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not quantized:
        return None
    schemes = {m.scheme for n, m in quantized if n != "lm_head"}
    head = next((m.scheme for n, m in quantized if n == "lm_head"), None)
    if len(schemes) > 1:
        raise InputError("the model mixes quantization schemes — quantize it with one method")
    scheme = schemes.pop() if schemes else head
    assert scheme is not None
    record = {
        "quant_method": QUANT_METHOD,
        "scheme": scheme.method,
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "modules": [n for n, _ in quantized],
    }
    if head is not None and head != scheme:  # the head in its own scheme (`quantize(include_head="int8")`)
        record["head"] = {"scheme": head.method, "bits": head.bits, "group_size": head.group_size}
    return record


def prepare_quantized(model: nn.Module, config: dict[str, Any], *, dtype: torch.dtype) -> None:
    """Replace the modules a `quantization_config` names by empty `QuantLinear`s on the model's
    device (meta while loading), ready to have the checkpoint's tensors assigned."""
    if not isinstance(config, dict) or config.get("quant_method") != QUANT_METHOD:
        method = config.get("quant_method") if isinstance(config, dict) else config
        raise InputError(
            f"config.json quantization_config has quant_method {method!r}, which lmstack cannot load — "
            f"load a float checkpoint or one `lmstack quantize` wrote (quant_method {QUANT_METHOD!r})"
        )
    try:
        scheme = QuantScheme.make(config["scheme"], config.get("group_size"))
        head = config.get("head")
        head_scheme = scheme if head is None else QuantScheme.make(head["scheme"], head.get("group_size"))
        modules = list(config["modules"])
    except (KeyError, TypeError) as exc:
        raise InputError(
            f"config.json quantization_config lacks {exc} — re-save the model with `lmstack quantize`"
        ) from None
    for name in modules:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise InputError(
                f"config.json quantization_config names module {name!r}, which is not a linear layer of "
                "this model — the config does not match the checkpoint; re-save it"
            )
        device = linear.weight.device
        _replace(
            model,
            name,
            QuantLinear(
                linear.in_features,
                linear.out_features,
                head_scheme if name == "lm_head" else scheme,
                bias=linear.bias is not None,
                device=device,
                dtype=dtype,
            ),
        )
    use_decode_head(model)
    fuse_quantized(model)
