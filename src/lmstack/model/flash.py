"""Flash attention in plain PyTorch: tiled, online softmax, O(s·d) memory for backward.

FlashAttention (Dao et al. 2022): never materialise the (s × s) score matrix. The forward pass walks
key tiles for each query tile keeping a running max `m`, a running normaliser `l` (`denom`) and an unnormalised
output; rescaling by exp(m_old - m_new) when the max grows makes the result exact (Milakov & Gimelshein
2018, "online softmax"). Only the output and the per-row log-sum-exp are saved; the backward pass
recomputes each tile's probabilities from them (Dao et al. 2022, Algorithm 2). This is the algorithm,
not a fast kernel: on CPU it is slower than `sdpa`, but its saved memory grows linearly with s.
"""

from __future__ import annotations

import torch

from lmstack.model.masks import sees


def _tile_scores(q, k, q_pos, k_pos, k_valid, causal, window, slopes, scale, q_seg=None, k_seg=None):
    """Masked, biased scores (B, KV, G, bq, bk) for one tile, in float32."""
    s = torch.matmul(q, k.transpose(-1, -2)).to(_acc_dtype(q)) * scale
    qp, kp = q_pos[:, None, None, :, None], k_pos[:, None, None, None, :]
    if slopes is not None:  # ALiBi: penalise distance linearly, a slope per head
        s = s - slopes[None, :, :, None, None].to(s.dtype) * (qp - kp).to(s.dtype)
    allowed = sees(qp, kp, causal=causal, window=window)
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, None, None, :]
    if q_seg is not None:  # packed rows: a query sees its own segment only (masks.attention_mask)
        allowed = allowed & (q_seg[:, None, None, :, None] == k_seg[:, None, None, None, :])
    return s.masked_fill(~allowed, float("-inf"))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Softmax statistics accumulate in at least float32 (bf16/fp16 inputs), float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _tile_needed(q_pos, k_pos, causal, window) -> bool:
    """False when no query of the tile can see any key of it (skips most tiles of a causal pass)."""
    if causal and int(k_pos.min()) > int(q_pos.max()):
        return False
    if window is not None and int(q_pos.min()) - int(k_pos.max()) >= window:
        return False
    return True


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, k_valid, causal, window, slopes, scale, block, segments):
        # q: (B, KV, G, T, D); k, v: (B, KV, 1, S, D) — GQA shares K/V across the G query heads by broadcast.
        T, S = q.shape[-2], k.shape[-2]
        acc_dtype = _acc_dtype(q)
        out = torch.empty(q.shape, dtype=acc_dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=acc_dtype, device=q.device)
        for qs in range(0, T, block):
            qe = min(qs + block, T)
            q_t, qp = q[..., qs:qe, :], q_pos[:, qs:qe]
            m = torch.full(q_t.shape[:-1], float("-inf"), dtype=acc_dtype, device=q.device)
            denom = torch.zeros(q_t.shape[:-1], dtype=acc_dtype, device=q.device)
            acc = torch.zeros(q_t.shape[:-1] + (v.shape[-1],), dtype=acc_dtype, device=q.device)
            for ks in range(0, S, block):
                ke = min(ks + block, S)
                kp = k_pos[:, ks:ke]
                if not _tile_needed(qp, kp, causal, window):
                    continue
                kv_valid = None if k_valid is None else k_valid[:, ks:ke]
                q_seg, k_seg = (None, None) if segments is None else (segments[:, qs:qe], segments[:, ks:ke])
                s = _tile_scores(
                    q_t, k[..., ks:ke, :], qp, kp, kv_valid, causal, window, slopes, scale, q_seg, k_seg
                )
                m_new = torch.maximum(m, s.amax(-1))
                m_safe = torch.where(
                    torch.isinf(m_new), torch.zeros_like(m_new), m_new
                )  # rows with no key yet
                p = torch.exp(s - m_safe[..., None])
                alpha = torch.exp(m - m_safe)
                denom = denom * alpha + p.sum(-1)
                acc = acc * alpha[..., None] + torch.matmul(p.to(v.dtype), v[..., ks:ke, :]).to(acc_dtype)
                m = m_new
            seen = denom > 0  # a query that sees no key (a padding slot) outputs zeros
            out[..., qs:qe, :] = torch.where(seen[..., None], acc / denom.clamp_min(1e-30)[..., None], 0.0)
            lse[..., qs:qe] = torch.where(seen, m + torch.log(denom.clamp_min(1e-30)), float("inf"))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos, k_valid, segments)
        ctx.options = (causal, window, slopes, scale, block)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, q_pos, k_pos, k_valid, segments = ctx.saved_tensors
        causal, window, slopes, scale, block = ctx.options
        T, S = q.shape[-2], k.shape[-2]
        acc_dtype = _acc_dtype(q)
        d_out = d_out.to(acc_dtype)
        delta = (d_out * out.to(acc_dtype)).sum(-1)  # D_i = rowsum(dO ∘ O), the softmax Jacobian's correction
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
        for qs in range(0, T, block):
            qe = min(qs + block, T)
            q_t, qp, do_t = q[..., qs:qe, :].to(acc_dtype), q_pos[:, qs:qe], d_out[..., qs:qe, :]
            for ks in range(0, S, block):
                ke = min(ks + block, S)
                kp = k_pos[:, ks:ke]
                if not _tile_needed(qp, kp, causal, window):
                    continue
                k_t, v_t = k[..., ks:ke, :].to(acc_dtype), v[..., ks:ke, :].to(acc_dtype)
                kv_valid = None if k_valid is None else k_valid[:, ks:ke]
                q_seg, k_seg = (None, None) if segments is None else (segments[:, qs:qe], segments[:, ks:ke])
                s = _tile_scores(q_t, k_t, qp, kp, kv_valid, causal, window, slopes, scale, q_seg, k_seg)
                p = torch.exp(s - lse[..., qs:qe, None])  # recomputed probabilities, (B, KV, G, bq, bk)
                dv[..., ks:ke, :] += torch.matmul(p.transpose(-1, -2), do_t).sum(2, keepdim=True)
                dp = torch.matmul(do_t, v_t.transpose(-1, -2))
                ds = p * (dp - delta[..., qs:qe, None]) * scale
                dq[..., qs:qe, :] += torch.matmul(ds, k_t)
                dk[..., ks:ke, :] += torch.matmul(ds.transpose(-1, -2), q_t).sum(2, keepdim=True)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 9)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None,
    *,
    causal: bool = True,
    window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    scale: float,
    block_size: int = 128,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output (B, H, T, D) for q (B, H, T, D) and k, v (B, KV, S, D), tiled; `segments` (B, T)
    for packed rows (queries and keys the same tokens) keeps each query within its segment."""
    B, H, T, D = q.shape
    n_kv = k.shape[1]
    group = H // n_kv
    qg = q.reshape(B, n_kv, group, T, D)  # (B, H, T, D) -> (B, KV, G, T, D); heads h = kv * G + g
    slopes = None if alibi_slopes is None else alibi_slopes.to(q.device).reshape(n_kv, group)
    out = FlashAttention.apply(
        qg,
        k[:, :, None],
        v[:, :, None],
        q_pos,
        k_pos,
        k_valid,
        causal,
        window,
        slopes,
        scale,
        block_size,
        segments,
    )
    return out.reshape(B, H, T, v.shape[-1])
