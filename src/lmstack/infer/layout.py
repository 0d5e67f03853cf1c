"""Weight memory layout tuned for decoding: same values, same shapes, faster matrix-vector products.

Decoding one token multiplies a vector by every weight matrix, so it is bound by how fast the weights
stream from memory (~1 FLOP per weight byte: memory-bandwidth-bound). `nn.Linear` keeps W as (out, in)
rows; BLAS libraries do not read both storage orders equally fast (on some CPUs the (in, out) order is
markedly quicker for wide matrices such as the LM head). `optimize_for_decode` times both orders for
each distinct weight shape of the model, on the model's own matrices so the timing streams from main
memory as decoding does, and re-stores each group in the faster order as a transposed view of
(in, out) storage. Parameters keep their shape, values and names; only their strides change, so the
model still trains and saves as before. It is opt-in because it rewrites the model's storage.

It then stores each attention's q, k, v weights as row blocks of one tensor (`fuse_qkv`), so a decode
step does one matrix product instead of three (0.5-2% of a GPT-2-124M fp32 batch-1 decode step on
one CPU thread, measured against the separate products). The projections stay separate modules: replacing one afterwards (a LoRA or quantized
wrapper) simply turns the fused product off for that layer.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model.attention import Attention, FusedQKV

_TIMING_BYTES = 128 * 2**20  # stream at least this much per timing so caches cannot hold it


def _decode_matrices(model: nn.Module) -> dict[tuple[int, int], list[nn.Parameter]]:
    """The matrices a decode step multiplies by, grouped by shape (out, in)."""
    groups: dict[tuple[int, int], list[nn.Parameter]] = defaultdict(list)
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            groups[tuple(module.weight.shape)].append(module.weight)
    return groups  # a tied LM head is an nn.Linear sharing the embedding's weight, counted once


def _time_linear(weights: list[torch.Tensor], repeats: int, scratch: torch.Tensor) -> float:
    x = torch.randn(1, 1, weights[0].shape[1], dtype=weights[0].dtype, device=weights[0].device)
    best = float("inf")
    for _ in range(repeats):
        scratch.add_(1.0)  # evict the caches: decoding reads each matrix from main memory
        start = time.perf_counter()
        for w in weights:
            F.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return best


def _is_in_out(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.stride() == (1, w.shape[0])


def _reordered(w: torch.Tensor, in_out: bool) -> torch.Tensor:
    """`w` (out, in) stored as (in, out) rows (a transposed view) or as plain (out, in) rows."""
    return w.t().contiguous().t() if in_out else w.contiguous()


@torch.no_grad()
def fuse_qkv(model: nn.Module) -> int:
    """Re-store every attention's q, k, v parameters as views of one (q + 2·kv, d) tensor, in the memory
    order they already have; returns how many layers were fused. Values, shapes and names are kept."""
    fused = 0
    for attn in (m for m in model.modules() if isinstance(m, Attention)):
        linears = (attn.q, attn.k, attn.v)
        if not all(type(m) is nn.Linear for m in linears):
            continue  # a wrapped projection computes its own output
        weight = _reordered(torch.cat([m.weight for m in linears]), _is_in_out(attn.q.weight))
        bias = torch.cat([m.bias for m in linears]) if attn.q.bias is not None else None
        rows = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = weight[rows : rows + n]
            if bias is not None:
                m.bias.data = bias[rows : rows + n]
            rows += n
        attn.fused_qkv = FusedQKV(linears, weight, bias)
        fused += 1
    return fused


@torch.no_grad()
def optimize_for_decode(model: nn.Module, *, repeats: int = 3, margin: float = 0.05) -> dict[str, str]:
    """Store each weight group in the faster order for batch-1 decoding, then fuse q, k, v (`fuse_qkv`);
    returns {shape: "out_in" | "in_out"}.

    A group switches only when the transposed order is faster by more than `margin` (5%).
    CPU only: on GPUs the matrix kernels read either order at full speed.
    """
    choice: dict[str, str] = {}
    scratch = torch.zeros(_TIMING_BYTES // 4)
    for shape, params in _decode_matrices(model).items():
        if params[0].device.type != "cpu":
            continue
        per = params[0].numel() * params[0].element_size()
        sample = params[: max(1, min(len(params), -(-_TIMING_BYTES // per)))]
        in_out = _is_in_out(params[0])
        other = [_reordered(p.data, not in_out) for p in sample]
        t_current = _time_linear([p.data for p in sample], repeats, scratch)
        t_other = _time_linear(other, repeats, scratch)
        del other
        if t_other < (1 - margin) * t_current:
            for p in params:
                p.data = _reordered(p.data, not in_out)
            in_out = not in_out
        choice[f"{shape[0]}x{shape[1]}"] = "in_out" if in_out else "out_in"
    fuse_qkv(model)
    return choice
