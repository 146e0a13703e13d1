"""Attention kernels: dense batched SDPA and exact variable-length (per-sample) attention.

Layout convention is the official one: tokens ``[..., L, H, D]`` (heads after the sequence axis).
Variable-length batches are *packed* (rows of sample b are one contiguous block) and attention never
crosses samples. Instead of padding every sample to the longest (wasted work, masks) we run
``torch.nn.functional.scaled_dot_product_attention`` once per sample, writing into a preallocated
output; when all samples have the same length the batch is reshaped and runs as one call. Batches
are small (1–2 samples, ×2 with CFG), so the loop costs nothing next to the attention itself, and the
result is exact (full, non-causal, scale ``1/sqrt(D)``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["scaled_dot_product_attention", "varlen_attention"]


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full attention on ``q [B, Lq, H, D]``, ``k/v [B, Lk, H, D]`` → ``[B, Lq, H, D]``."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     q_seqlens: Sequence[int], kv_seqlens: Sequence[int]) -> torch.Tensor:
    """Packed variable-length attention.

    Args:
        q: ``[Nq, H, D]`` rows of all samples, sample b in a contiguous block of ``q_seqlens[b]``.
        k, v: ``[Nk, H, Dk]`` / ``[Nk, H, Dv]`` packed the same way with ``kv_seqlens``.
    Returns:
        ``[Nq, H, Dv]``; row block b attends only to key block b.
    """
    q_seqlens, kv_seqlens = [int(s) for s in q_seqlens], [int(s) for s in kv_seqlens]
    if len(q_seqlens) != len(kv_seqlens):
        raise ValueError("q_seqlens and kv_seqlens must have one entry per sample")
    if sum(q_seqlens) != q.shape[0] or sum(kv_seqlens) != k.shape[0]:
        raise ValueError(f"seqlens {q_seqlens}/{kv_seqlens} do not add up to rows {q.shape[0]}/{k.shape[0]}")
    B = len(q_seqlens)
    if B == 0:
        return q.new_empty(0, q.shape[1], v.shape[2])
    if len(set(q_seqlens)) == 1 and len(set(kv_seqlens)) == 1:
        out = scaled_dot_product_attention(q.view(B, q_seqlens[0], *q.shape[1:]),
                                           k.view(B, kv_seqlens[0], *k.shape[1:]),
                                           v.view(B, kv_seqlens[0], *v.shape[1:]))
        return out.reshape(q.shape[0], q.shape[1], v.shape[2])
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    qs = ks = 0
    for lq, lk in zip(q_seqlens, kv_seqlens):
        if lq:
            if lk == 0:
                out[qs:qs + lq] = 0  # nothing to attend to (SDPA would give NaN)
            else:
                out[qs:qs + lq] = scaled_dot_product_attention(
                    q[None, qs:qs + lq], k[None, ks:ks + lk], v[None, ks:ks + lk])[0]
        qs += lq
        ks += lk
    return out
