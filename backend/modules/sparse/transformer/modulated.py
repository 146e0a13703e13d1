"""AdaLN-modulated DiT block with cross-attention on a :class:`SparseTensor`."""

from __future__ import annotations

import torch

from ...transformer import ModulatedCrossBlockBase, split_modulation
from ..attention import SparseMultiHeadAttention
from ..basic import SparseTensor

__all__ = ["ModulatedSparseTransformerCrossBlock"]


class ModulatedSparseTransformerCrossBlock(ModulatedCrossBlockBase):
    """Sparse counterpart of ``ModulatedTransformerCrossBlock`` (same keys and arithmetic).

    The per-item modulation ``[B, C]`` is broadcast to the rows of each item.
    """

    attention_cls = SparseMultiHeadAttention

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
