"""AdaLN-modulated DiT block with cross-attention on a :class:`SparseTensor`."""

from __future__ import annotations

import torch
from torch import nn

from ...transformer import FeedForwardNet, LayerNorm32, split_modulation
from ..attention import SparseMultiHeadAttention
from ..basic import SparseTensor

__all__ = ["ModulatedSparseTransformerCrossBlock"]


class ModulatedSparseTransformerCrossBlock(nn.Module):
    """Sparse counterpart of ``ModulatedTransformerCrossBlock`` (same keys and arithmetic).

    The per-item modulation ``[B, C]`` is broadcast to the rows of each item.
    """

    def __init__(self, channels: int, ctx_channels: int, num_heads: int, mlp_ratio: float = 4.0,
                 attn_mode: str = "full", use_checkpoint: bool = False, use_rope: bool = False,
                 rope_freq: tuple[float, float] = (1.0, 10000.0), qk_rms_norm: bool = False,
                 qk_rms_norm_cross: bool = False, qkv_bias: bool = True, share_mod: bool = False):
        super().__init__()
        self.share_mod = share_mod
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = SparseMultiHeadAttention(channels, num_heads, type="self", attn_mode=attn_mode,
                                                  qkv_bias=qkv_bias, use_rope=use_rope,
                                                  rope_freq=rope_freq, qk_rms_norm=qk_rms_norm)
        self.cross_attn = SparseMultiHeadAttention(channels, num_heads, ctx_channels=ctx_channels,
                                                   type="cross", attn_mode=attn_mode, qkv_bias=qkv_bias,
                                                   qk_rms_norm=qk_rms_norm_cross)
        self.mlp = FeedForwardNet(channels, mlp_ratio=mlp_ratio)
        if share_mod:
            self.modulation = nn.Parameter(torch.randn(6 * channels) / channels ** 0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels, bias=True))

    def forward(self, x: SparseTensor, mod: torch.Tensor, context: torch.Tensor) -> SparseTensor:
        """``x`` rows ``[N, C]``, ``mod [B, 6C]`` (shared) or ``t_emb [B, C]``, ``context [B, Lc, Cc]``."""
        # per-row modulation: one gather of the [B, 6C] table instead of six
        mods = x.broadcast_batch(torch.stack(split_modulation(self, mod), dim=0).transpose(0, 1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.unbind(dim=1)
        f = x.feats
        h = self.norm1(f) * (1 + scale_msa) + shift_msa
        f = f + self.self_attn(x.replace(h)).feats * gate_msa
        f = f + self.cross_attn(x.replace(self.norm2(f)), context).feats
        h = self.norm3(f) * (1 + scale_mlp) + shift_mlp
        f = f + self.mlp(h) * gate_mlp
        return x.replace(f)
