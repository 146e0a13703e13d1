"""``SLatFlowModel``: the sparse DiT of stages 2 and 3 (shape / texture structured latents).

Same parameter names and shapes as ``trellis2/models/structured_latent_flow.py`` (identical to the
sparse-structure flow except ``input_layer`` / ``out_layer``). The texture model receives the
normalised shape latent as ``concat_cond`` (concatenated after the noise on the feature axis).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..modules.sparse import SparseTensor
from ..modules.sparse.attention import sparse_rope_phases
from ..modules.sparse.transformer import ModulatedSparseTransformerCrossBlock
from .flow_transformer import FlowTransformerBase

__all__ = ["SLatFlowModel"]


class SLatFlowModel(FlowTransformerBase):
    """Flow transformer on sparse voxel latents, conditioned on image tokens.

    ``forward(x: SparseTensor [N, in - concat], t [B] (already ×1000), cond [B, L, cond_channels],
    concat_cond: SparseTensor | None)`` → ``SparseTensor [N, out]`` with the same rows and coords.
    ``resolution`` is accepted for config compatibility; the forward does not use it.
    """

    block_cls = ModulatedSparseTransformerCrossBlock

    def forward(self, x: SparseTensor, t: torch.Tensor, cond: torch.Tensor,
                concat_cond: SparseTensor | None = None, **kwargs: Any) -> SparseTensor:
        feats = x.feats
        if concat_cond is not None:
            if concat_cond.feats.shape[0] != feats.shape[0]:
                raise ValueError("concat_cond must have the rows of x")
            feats = torch.cat([feats, concat_cond.feats], dim=-1)
        if feats.shape[-1] != self.in_channels:
            raise ValueError(f"input has {feats.shape[-1]} channels, model expects {self.in_channels}")
        if cond.shape[0] != x.batch_size:
            raise ValueError(f"cond batch {cond.shape[0]} != sparse batch {x.batch_size}")
        h = x.replace(self.input_layer(feats).to(self.dtype))
        mod = self.timestep_modulation(t)
        cond = cond.to(self.dtype)
        h.layout  # compute the per-item row slices once; every replace() below reuses them
        sparse_rope_phases(h, self.model_channels // self.num_heads, self.rope_freq)  # fill the cache once
        for block in self.blocks:
            h = block(h, mod, cond)
        out = F.layer_norm(h.feats.to(x.feats.dtype), h.feats.shape[-1:])
        return x.replace(self.out_layer(out))
