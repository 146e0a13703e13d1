"""AdaLN-modulated DiT block with cross-attention (dense tokens)."""

from __future__ import annotations

import torch
from torch import nn

from ..attention import MultiHeadAttention, MultiHeadAttentionBase
from .blocks import FeedForwardNet, LayerNorm32

__all__ = ["ModulatedCrossBlockBase", "ModulatedTransformerCrossBlock", "split_modulation"]


def split_modulation(block: nn.Module, mod: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The six ``[B, C]`` modulation vectors of ``block`` for the model-level ``mod``.

    With ``share_mod`` the block adds its own ``modulation [6C]`` to the shared ``mod [B, 6C]``
    (then casts to ``mod``'s dtype); otherwise it applies its own ``adaLN_modulation`` to ``mod``
    (= ``t_emb``). Order: shift/scale/gate of the attention, then shift/scale/gate of the FFN.
    """
    if block.share_mod:
        return (block.modulation + mod).type(mod.dtype).chunk(6, dim=1)
    return block.adaLN_modulation(mod).chunk(6, dim=1)


class ModulatedCrossBlockBase(nn.Module):
    """Modules of the adaLN-modulated cross-attention DiT block, dense or sparse (no ``forward``).

    Subclasses set :attr:`attention_cls` (built as ``self_attn`` and ``cross_attn`` with the same
    arguments) and implement ``forward``. Keys: ``norm1`` / ``norm3`` (non-affine) and ``norm2``
    (affine) LayerNorms, eps 1e-6 in fp32; ``self_attn``, ``cross_attn``, ``mlp``; with
    ``share_mod`` a ``modulation [6C]`` parameter added to the model's shared ``mod``, else an own
    ``adaLN_modulation``. ``use_checkpoint`` is accepted and ignored.
    """

    #: the multi-head attention class (dense or sparse)
    attention_cls: type[MultiHeadAttentionBase]

    def __init__(self, channels: int, ctx_channels: int, num_heads: int, mlp_ratio: float = 4.0,
                 attn_mode: str = "full", use_checkpoint: bool = False, use_rope: bool = False,
                 rope_freq: tuple[float, float] = (1.0, 10000.0), qk_rms_norm: bool = False,
                 qk_rms_norm_cross: bool = False, qkv_bias: bool = True, share_mod: bool = False):
        super().__init__()
        self.share_mod = share_mod
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = self.attention_cls(channels, num_heads, type="self", attn_mode=attn_mode,
                                            qkv_bias=qkv_bias, use_rope=use_rope, rope_freq=rope_freq,
                                            qk_rms_norm=qk_rms_norm)
        self.cross_attn = self.attention_cls(channels, num_heads, ctx_channels=ctx_channels,
                                             type="cross", attn_mode=attn_mode, qkv_bias=qkv_bias,
                                             qk_rms_norm=qk_rms_norm_cross)
        self.mlp = FeedForwardNet(channels, mlp_ratio=mlp_ratio)
        if share_mod:
            self.modulation = nn.Parameter(torch.randn(6 * channels) / channels ** 0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels, bias=True))


class ModulatedTransformerCrossBlock(ModulatedCrossBlockBase):
    """``x += g1·SelfAttn(LN1(x)·(1+s1)+b1)``; ``x += CrossAttn(LN2(x), ctx)``;
    ``x += g2·FFN(LN3(x)·(1+s2)+b2)``. LN1/LN3 non-affine, LN2 affine, all eps 1e-6 in fp32."""

    attention_cls = MultiHeadAttention

    def forward(self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor,
                phases: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, L, C]``, ``mod [B, 6C]`` (shared) or ``t_emb [B, C]``, ``context [B, Lc, Cc]``."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = split_modulation(self, mod)
        h = self.norm1(x) * (1 + scale_msa.unsqueeze(1)) + shift_msa.unsqueeze(1)
        x = x + self.self_attn(h, phases=phases) * gate_msa.unsqueeze(1)
        x = x + self.cross_attn(self.norm2(x), context)
        h = self.norm3(x) * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1)
        return x + self.mlp(h) * gate_mlp.unsqueeze(1)
