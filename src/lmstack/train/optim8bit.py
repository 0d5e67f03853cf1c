"""AdamW with 8-bit moments: block-wise dynamic quantisation (Dettmers et al. 2022).

AdamW keeps two fp32 moments per parameter, 8 bytes, twice the fp32 weight itself. "8-bit Optimizers
via Block-wise Quantization" stores each moment as one byte per element:

- **Dynamic quantisation map.** 256 values spread over many orders of magnitude rather than evenly:
  a code is a sign bit (signed map only), then a run of zero bits whose length k picks the decade
  10^-k, an indicator 1 bit, and the remaining bits a linear fraction in [0.1, 1]. Large decades get
  few fraction bits, small ones many, so both the rare large moments and the many tiny ones keep a
  small *relative* error. m is signed; v = E[g²] is never negative, so its map spends the sign bit on
  one more fraction bit.
- **Block-wise normalisation.** The flattened moment is cut into blocks (2048 in the paper); each
  block is divided by its own absmax before being rounded to the nearest map value. An outlier then
  costs precision only within its block, and blocks quantise independently.

Each step dequantises m and v to fp32, applies the ordinary AdamW update in fp32 (using the new,
unrounded moments), and quantises them again. Tensors smaller than `min_8bit_size` (norm gains,
biases) keep fp32 moments: their state is negligible and the paper (and bitsandbytes) do the same.

The state is plain tensors (uint8 codes, fp32 absmax per block, fp32 step), so `optimizer_tensors`
saves it in safetensors and a resumed run continues bit for bit.

On the CPU, fp32 weights step through `adamw8bit.c`, which does the same arithmetic in one fused pass
per block: on 32M parameters at one thread ~15× faster than the dozen PyTorch operations per chunk
below, and ~3× faster than bitsandbytes' CPU `AdamW8bit`. It is compiled on first use like the
quantized-linear kernels; `LMSTACK_KERNELS=0`, a missing compiler, other dtypes and other devices
select the PyTorch version.
"""

from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.errors import InputError
from lmstack.train.optim import param_groups

BLOCK_SIZE = 2048
MIN_8BIT_SIZE = 4096
CHUNK_BLOCKS = 256  # blocks dequantised at a time by the PyTorch step (see AdamW8bit._update_8bit_torch)


def dynamic_map(signed: bool = True, exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic quantisation map: 2**total_bits sorted fp32 values in [-1, 1] ([0, 1] unsigned).

    Decade 10^-k (k = 0 … exponent_bits-1) gets exponent_bits-1-k fraction bits (one more when
    unsigned): its values are the midpoints of that many equal bins of [0.1, 1], times 10^-k, mirrored
    to negative when signed. Zero and 1.0 complete the map (unused slots, if any, repeat zero).
    """
    data: list[float] = []
    magnitude_bits = total_bits - 1  # bits after the sign (the unsigned map uses the sign bit too)
    for i in range(exponent_bits):
        fraction_bits = i + magnitude_bits - exponent_bits + (0 if signed else 1)
        edges = torch.linspace(0.1, 1.0, 2**fraction_bits + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2
        scale = 10.0 ** (i - (exponent_bits - 1))
        data += (scale * mids).tolist()  # products rounded to fp32, as bitsandbytes builds its map
        if signed:
            data += (-scale * mids).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def quantize_blockwise(
    x: torch.Tensor, qmap: torch.Tensor, block_size: int = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like x, fp32 absmax per block): each block / its absmax, to the nearest map value."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % block_size)).view(-1, block_size)  # (n_blocks, block)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    qmap = qmap.to(flat.device)
    # nearest map value: the bucket between consecutive midpoints
    codes = torch.bucketize(normed, (qmap[1:] + qmap[:-1]) / 2).to(torch.uint8)
    return codes.view(-1)[:n].view(x.shape), absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block_size: int = BLOCK_SIZE
) -> torch.Tensor:
    """fp32 values of `codes`: map value × its block's absmax."""
    flat = qmap.to(codes.device)[codes.reshape(-1).long()]
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % block_size)).view(-1, block_size)
    return (blocks * absmax[:, None]).view(-1)[:n].view(codes.shape)


@functools.cache
def _kernel() -> ctypes.CDLL | None:
    """The compiled fused step (`adamw8bit.c`), or None: then the PyTorch operations run."""
    from lmstack.compress.kernels.build import load_source

    # no contraction into multiply-adds beyond those the source spells (to match PyTorch's rounding);
    # no errno from sqrtf, so its loop vectorises
    lib = load_source(Path(__file__).with_name("adamw8bit.c"), ("-ffp-contract=off", "-fno-math-errno"))
    if lib is None or lib.lm_adamw8bit_abi() != 1:
        return None
    p, n = ctypes.c_void_p, ctypes.c_long
    lib.lm_adamw8bit_step.argtypes = [p, p, p, p, p, p, n, n, p, p, p, p, p, p, p, ctypes.c_int]
    lib.lm_adamw8bit_step.restype = None
    return lib


def code_table(qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the 255 midpoints between `qmap`'s values, the uint8 code of the lowest float32 with each
    possible top 16 bits): the fused step's quantisation starts at the table's code and steps up
    past the midpoints below x, which gives `quantize_blockwise`'s code exactly."""
    mids = (qmap[1:] + qmap[:-1]) / 2
    prefix = torch.arange(1 << 16, dtype=torch.int64)
    # the lowest value of a prefix: the smallest mantissa when positive, the largest when negative
    bits = (prefix << 16) | torch.where(prefix >= 1 << 15, 0xFFFF, 0)
    values = bits.to(torch.int32).view(torch.float32).nan_to_num(0.0)  # NaN prefixes: never looked up
    return mids.contiguous(), torch.bucketize(values, mids).clamp_(0, 255).to(torch.uint8)


def adamw_update(
    p: torch.Tensor,
    grad: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    beta1: float,
    beta2: float,
    lr: float,
    eps: float,
    weight_decay: float,
    t: float,
) -> None:
    """One AdamW step of `p` in place, in fp32, with fp32 moments `m`, `v` (updated in place)."""
    g = grad.float()
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
    weights = p.float()  # p itself when p is fp32
    if weight_decay:
        weights.mul_(1 - lr * weight_decay)  # decoupled decay (Loshchilov & Hutter 2019)
    weights.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
    if weights is not p:
        p.copy_(weights)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose moments are stored in 8 bits; see the module doc."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        block_size: int = BLOCK_SIZE,
        min_8bit_size: int = MIN_8BIT_SIZE,
    ) -> None:
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0:
            raise InputError(
                f"lr={lr}, eps={eps}, weight_decay={weight_decay} must be >= 0 — fix the setting"
            )
        if not all(0 <= b < 1 for b in betas):
            raise InputError(f"betas={betas} must lie in [0, 1) — use e.g. (0.9, 0.95)")
        if block_size < 1:
            raise InputError(f"block_size={block_size} must be positive — use {BLOCK_SIZE}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.block_size, self.min_8bit_size = block_size, min_8bit_size
        self._maps: dict[tuple, Any] = {}

    def qmap(self, signed: bool, device: torch.device) -> torch.Tensor:
        """The signed (for m) or unsigned (for v) dynamic map, built once per device."""
        key = (signed, device)
        if key not in self._maps:
            self._maps[key] = dynamic_map(signed=signed).to(device)
        return self._maps[key]

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {"step": torch.zeros((), dtype=torch.float32)}  # on the CPU
        if p.numel() < self.min_8bit_size:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            return state
        blocks = -(-p.numel() // self.block_size)
        for name in ("exp_avg", "exp_avg_sq"):
            # all-zero codes would not decode to 0 in the signed map: every element gets zero's code
            code, _ = quantize_blockwise(torch.zeros(1), self.qmap(name == "exp_avg", torch.device("cpu")))
            state[f"{name}_codes"] = torch.full(p.shape, int(code), dtype=torch.uint8, device=p.device)
            state[f"{name}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise InputError("AdamW8bit does not take sparse gradients — use dense embeddings")
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                state["step"] += 1
                hyper = (beta1, beta2, lr, eps, wd, state["step"].item())
                if "exp_avg_codes" not in state:
                    adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], *hyper)
                    continue
                self._update_8bit(p, state, hyper)
        return loss

    def _fused(self, p: torch.Tensor) -> ctypes.CDLL | None:
        """The compiled step when it applies: fp32 CPU weights and gradients, blocks it can hold."""
        tensors = [p, p.grad, *(t for t in self.state[p].values() if t.dim())]
        if p.device.type != "cpu" or p.dtype != torch.float32 or p.grad.dtype != torch.float32:
            return None
        if not all(t.is_contiguous() and t.device == p.device for t in tensors):
            return None
        lib = _kernel()
        return lib if lib is not None and self.block_size <= lib.lm_adamw8bit_max_block() else None

    def _tables(self, signed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(map, midpoints, code table) of the signed or unsigned map, for the compiled step."""
        key = ("table", signed)
        if key not in self._maps:
            qmap = self.qmap(signed, torch.device("cpu"))
            self._maps[key] = (qmap, *code_table(qmap))
        return self._maps[key]

    def _update_8bit(self, p: torch.Tensor, state: dict[str, torch.Tensor], hyper: tuple) -> None:
        """One step of an 8-bit-state parameter: compiled where it applies, else PyTorch's operations."""
        lib = self._fused(p)
        if lib is None:
            self._update_8bit_torch(p, state, hyper)
            return
        beta1, beta2, lr, eps, wd, t = hyper
        consts = [beta1, 1 - beta1, beta2, 1 - beta2, math.sqrt(1 - beta2**t), eps, 1 - lr * wd]
        consts += [-lr / (1 - beta1**t), 1.0 if wd else 0.0]
        scalars = torch.tensor(consts, dtype=torch.float32)  # each double rounded once, as PyTorch does
        tables = [table.data_ptr() for table in (*self._tables(True), *self._tables(False))]
        lib.lm_adamw8bit_step(
            p.data_ptr(), p.grad.data_ptr(), state["exp_avg_codes"].data_ptr(), state["exp_avg_absmax"].data_ptr(),
            state["exp_avg_sq_codes"].data_ptr(), state["exp_avg_sq_absmax"].data_ptr(), p.numel(),
            self.block_size, *tables, scalars.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip

    def _update_8bit_torch(self, p: torch.Tensor, state: dict[str, torch.Tensor], hyper: tuple) -> None:
        """Dequantise, update and requantise `CHUNK_BLOCKS` blocks at a time: the step then holds fp32
        moments and temporaries for one chunk (~15 MB with blocks of 2048) beside the 8-bit state, never
        for the whole tensor (~5 GB for a 50k × 4096 embedding). Blocks are independent, so the result
        is the same as one pass over the whole tensor."""
        bs = self.block_size
        signed_map, unsigned_map = self.qmap(True, p.device), self.qmap(False, p.device)
        work = p if p.is_contiguous() else p.contiguous()
        flat, grad = work.view(-1), p.grad.reshape(-1)
        m_codes, v_codes = state["exp_avg_codes"].view(-1), state["exp_avg_sq_codes"].view(-1)
        m_absmax, v_absmax = state["exp_avg_absmax"], state["exp_avg_sq_absmax"]
        chunk = CHUNK_BLOCKS * bs
        for start in range(0, flat.numel(), chunk):
            end = min(start + chunk, flat.numel())
            blocks = slice(start // bs, -(-end // bs))
            m = dequantize_blockwise(m_codes[start:end], m_absmax[blocks], signed_map, bs)
            v = dequantize_blockwise(v_codes[start:end], v_absmax[blocks], unsigned_map, bs)
            adamw_update(flat[start:end], grad[start:end], m, v, *hyper)
            codes, absmax = quantize_blockwise(m, signed_map, bs)
            m_codes[start:end], m_absmax[blocks] = codes, absmax
            codes, absmax = quantize_blockwise(v, unsigned_map, bs)
            v_codes[start:end], v_absmax[blocks] = codes, absmax
        if work is not p:
            p.copy_(work)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As `torch.optim.Optimizer`'s, but state tensors keep their own dtypes: torch would cast them
        to the parameter's dtype, turning uint8 codes into floats and rounding fp32 absmax to bf16."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params))
        for key, saved in state_dict["state"].items():
            p = by_id[key]
            # the step counter stays on the CPU, so reading it for the bias correction never syncs a GPU
            self.state[p] = {
                k: v.to("cpu" if k == "step" else p.device, copy=True) if isinstance(v, torch.Tensor) else v
                for k, v in saved.items()
            }


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's state tensors (the figure 8-bit optimizers shrink)."""
    return sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )


def build_optimizer_8bit(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    decay_embeddings: bool = False,
    block_size: int = BLOCK_SIZE,
) -> AdamW8bit:
    """`AdamW8bit` over the same `param_groups(model)` as `build_optimizer`, so checkpoints name its state."""
    groups = param_groups(model, weight_decay, decay_embeddings=decay_embeddings)
    return AdamW8bit(groups, lr=lr, betas=betas, eps=eps, block_size=block_size)
