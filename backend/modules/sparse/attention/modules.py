"""Multi-head attention over the voxels of a :class:`SparseTensor` (per-sample, no padding).

Same parameter names as the dense :class:`~backend.modules.attention.MultiHeadAttention`
(``to_qkv`` / ``to_q`` + ``to_kv``, ``q_rms_norm`` / ``k_rms_norm``, ``to_out``). Self-attention
is full attention among the rows of one batch item; cross-attention of item b attends to the dense
context ``context[b]`` only.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ...attention import MultiHeadRMSNorm, RotaryPositionEmbedder, apply_rotary_embedding, varlen_attention
from ..basic import SparseTensor

__all__ = ["SparseMultiHeadAttention", "sparse_rope_phases"]


def sparse_rope_phases(x: SparseTensor, head_dim: int,
                       rope_freq: tuple[float, float] = (1.0, 10000.0)) -> torch.Tensor:
    """``[N, head_dim/2]`` complex RoPE phases of the voxel coords ``(x, y, z)``; cached on ``x``."""
    key = f"rope_phases_{head_dim}_{rope_freq[0]}_{rope_freq[1]}"
    return x.get_cache(key, lambda: RotaryPositionEmbedder(head_dim, 3, rope_freq)(x.coords[:, 1:]))


class SparseMultiHeadAttention(nn.Module):
    """Attention whose queries are the rows of a sparse tensor.

    Args are those of the dense module: ``channels``, ``num_heads``, ``ctx_channels``, ``type``
    (``"self"``/``"cross"``), ``qkv_bias``, ``use_rope`` (self only; phases from the voxel coords)
    and ``qk_rms_norm``.
    """

    def __init__(self, channels: int, num_heads: int, ctx_channels: int | None = None,
                 type: Literal["self", "cross"] = "self", attn_mode: Literal["full"] = "full",
                 qkv_bias: bool = True, use_rope: bool = False,
                 rope_freq: tuple[float, float] = (1.0, 10000.0), qk_rms_norm: bool = False):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        if type not in ("self", "cross"):
            raise ValueError(f"unknown attention type {type!r}")
        if attn_mode != "full":
            raise NotImplementedError(f"attn_mode {attn_mode!r} (only 'full' is used by TRELLIS.2)")
        if use_rope and type == "cross":
            raise ValueError("RoPE is only supported for self-attention")
        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.ctx_channels = ctx_channels if ctx_channels is not None else channels
        self._type = type
        self.use_rope = use_rope
        self.rope_freq = tuple(rope_freq)
        self.qk_rms_norm = qk_rms_norm
        if type == "self":
            self.to_qkv = nn.Linear(channels, channels * 3, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
            self.to_kv = nn.Linear(self.ctx_channels, channels * 2, bias=qkv_bias)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: SparseTensor, context: torch.Tensor | None = None) -> SparseTensor:
        """``x`` rows ``[N, C]``; ``context [B, Lc, Cc]`` (dense) for cross-attention."""
        N = x.feats.shape[0]
        H, D = self.num_heads, self.head_dim
        seqlens = [s.stop - s.start for s in x.layout]
        if self._type == "self":
            q, k, v = self.to_qkv(x.feats).reshape(N, 3, H, D).unbind(dim=1)
            kv_seqlens = seqlens
        else:
            if context is None:
                raise ValueError("cross-attention needs a context")
            B, Lc = context.shape[:2]
            if B != len(seqlens):
                raise ValueError(f"context batch {B} != sparse batch {len(seqlens)}")
            q = self.to_q(x.feats).reshape(N, H, D)
            k, v = self.to_kv(context).reshape(B * Lc, 2, H, D).unbind(dim=1)
            kv_seqlens = [Lc] * B
        if self.qk_rms_norm:
            q = self.q_rms_norm(q)
            k = self.k_rms_norm(k)
        if self.use_rope:
            phases = sparse_rope_phases(x, D, self.rope_freq)
            q = apply_rotary_embedding(q, phases)
            k = apply_rotary_embedding(k, phases)
        h = varlen_attention(q, k, v, seqlens, kv_seqlens)
        return x.replace(self.to_out(h.reshape(N, self.channels)))
