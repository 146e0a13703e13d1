"""Norm layers used by the sparse models (computed in float32, cast back, as the official classes).

``LayerNorm32`` works on plain tensors (the SC-VAE blocks call it on ``x.feats``);
``SparseLayerNorm32`` / ``SparseGroupNorm32`` take a :class:`SparseTensor` (group norm statistics are
per batch item, over that item's voxels).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .basic import SparseTensor

__all__ = ["LayerNorm32", "SparseLayerNorm32", "SparseGroupNorm32"]


class LayerNorm32(nn.LayerNorm):
    """LayerNorm evaluated in float32 (input, weight and bias upcast), result cast to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class SparseLayerNorm32(LayerNorm32):
    """:class:`LayerNorm32` over the channels of every voxel of a :class:`SparseTensor`."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.feats))


class SparseGroupNorm32(nn.GroupNorm):
    """GroupNorm over each batch item's voxels (statistics per item and group), in float32."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        f = x.feats.float()
        n, c = f.shape
        g = self.num_groups
        bi = x.batch_index()
        B = x.batch_size
        counts = x.batch_counts().to(f.dtype).clamp_min(1) * (c // g)
        fg = f.reshape(n, g, c // g)
        s1 = torch.zeros(B, g, dtype=f.dtype, device=f.device).index_add_(0, bi, fg.sum(-1))
        s2 = torch.zeros(B, g, dtype=f.dtype, device=f.device).index_add_(0, bi, (fg * fg).sum(-1))
        mean = s1 / counts[:, None]
        var = (s2 / counts[:, None] - mean * mean).clamp_min(0)
        y = (fg - mean[bi, :, None]) * torch.rsqrt(var[bi, :, None] + self.eps)
        y = y.reshape(n, c)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return x.replace(y.to(x.feats.dtype))
