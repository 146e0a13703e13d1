"""Dense multi-head attention of the TRELLIS.2 DiTs (self- and cross-attention).

Parameter names follow the official modules: self-attention ``to_qkv`` (q, k, v, head-major),
cross-attention ``to_q`` + ``to_kv`` (k, v), optional ``q_rms_norm`` / ``k_rms_norm`` (``gamma
[H, D]``) and ``to_out``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .full_attn import scaled_dot_product_attention
from .rope import apply_rotary_embedding

__all__ = ["MultiHeadRMSNorm", "MultiHeadAttentionBase", "MultiHeadAttention"]


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS norm: ``normalize(x, dim=-1) · gamma[H, D] · sqrt(D)``, computed in fp32."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)


class MultiHeadAttentionBase(nn.Module):
    """Parameters and q/k post-processing shared by :class:`MultiHeadAttention` and the sparse
    ``SparseMultiHeadAttention`` (which differ only in how tokens are laid out in ``forward``).

    Args:
        channels: model width C.
        num_heads: number of heads H (head dim C / H).
        ctx_channels: width of the context tokens (cross-attention), defaults to C.
        type: ``"self"`` or ``"cross"``.
        attn_mode: only ``"full"``.
        qkv_bias: bias on the projections.
        use_rope: rotate q and k (self-attention only).
        rope_freq: RoPE base frequencies, stored as a tuple.
        qk_rms_norm: per-head RMS norm on q and k (before RoPE).
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

    def _norm_and_rotate(self, q: torch.Tensor, k: torch.Tensor,
                         phases: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``q``/``k [..., H, D]`` after the per-head RMS norms (``qk_rms_norm``), then RoPE with
        ``phases`` (``use_rope``; raises ``ValueError`` if ``phases`` is None then)."""
        if self.qk_rms_norm:
            q = self.q_rms_norm(q)
            k = self.k_rms_norm(k)
        if self.use_rope:
            if phases is None:
                raise ValueError("use_rope=True needs phases")
            q = apply_rotary_embedding(q, phases)
            k = apply_rotary_embedding(k, phases)
        return q, k


class MultiHeadAttention(MultiHeadAttentionBase):
    """Multi-head attention on ``[B, L, C]`` tokens.

    Args are those of :class:`MultiHeadAttentionBase`; with ``use_rope`` the phases are passed to
    :meth:`forward`.
    """

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                phases: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, L, C]``; ``context [B, Lc, Cc]`` for cross-attention; ``phases [L, D/2]`` or
        ``[B, L, D/2]`` complex RoPE phases for self-attention with ``use_rope``."""
        B, L, _ = x.shape
        H = self.num_heads
        if self._type == "self":
            q, k, v = self.to_qkv(x).reshape(B, L, 3, H, self.head_dim).unbind(dim=2)
        else:
            if context is None:
                raise ValueError("cross-attention needs a context")
            q = self.to_q(x).reshape(B, L, H, self.head_dim)
            k, v = self.to_kv(context).reshape(B, context.shape[1], 2, H, self.head_dim).unbind(dim=2)
        q, k = self._norm_and_rotate(q, k, phases)
        h = scaled_dot_product_attention(q, k, v)
        return self.to_out(h.reshape(B, L, self.channels))
