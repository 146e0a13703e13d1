"""Multi-head attention over the voxels of a :class:`SparseTensor` (per-sample, no padding).

Same parameter names as the dense :class:`~backend.modules.attention.MultiHeadAttention`
(``to_qkv`` / ``to_q`` + ``to_kv``, ``q_rms_norm`` / ``k_rms_norm``, ``to_out``). Self-attention
is full attention among the rows of one batch item; cross-attention of item b attends to the dense
context ``context[b]`` only.
"""

from __future__ import annotations

import torch

from ...attention import MultiHeadAttentionBase, RotaryPositionEmbedder, varlen_attention
from ..basic import SparseTensor

__all__ = ["SparseMultiHeadAttention", "sparse_rope_phases"]


def sparse_rope_phases(x: SparseTensor, head_dim: int,
                       rope_freq: tuple[float, float] = (1.0, 10000.0)) -> torch.Tensor:
    """``[N, head_dim/2]`` complex RoPE phases of the voxel coords ``(x, y, z)``; cached on ``x``."""
    key = f"rope_phases_{head_dim}_{rope_freq[0]}_{rope_freq[1]}"
    return x.get_cache(key, lambda: RotaryPositionEmbedder(head_dim, 3, rope_freq)(x.coords[:, 1:]))


class SparseMultiHeadAttention(MultiHeadAttentionBase):
    """Attention whose queries are the rows of a sparse tensor.

    Args are those of the dense module (:class:`~backend.modules.attention.MultiHeadAttentionBase`):
    ``channels``, ``num_heads``, ``ctx_channels``, ``type`` (``"self"``/``"cross"``), ``qkv_bias``,
    ``use_rope`` (self only; phases from the voxel coords) and ``qk_rms_norm``.
    """

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
        phases = sparse_rope_phases(x, D, self.rope_freq) if self.use_rope else None
        q, k = self._norm_and_rotate(q, k, phases)
        h = varlen_attention(q, k, v, seqlens, kv_seqlens)
        return x.replace(self.to_out(h.reshape(N, self.channels)))
