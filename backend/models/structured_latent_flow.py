"""``SLatFlowModel``: the sparse DiT of stages 2 and 3 (shape / texture structured latents).

Same parameter names and shapes as ``trellis2/models/structured_latent_flow.py`` (identical to the
sparse-structure flow except ``input_layer`` / ``out_layer``). The texture model receives the
normalised shape latent as ``concat_cond`` (concatenated after the noise on the feature axis).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.sparse import SparseTensor
from ..modules.sparse.attention import sparse_rope_phases
from ..modules.sparse.transformer import ModulatedSparseTransformerCrossBlock
from ..modules.transformer import TimestepEmbedder, convert_linear_to, str_to_dtype

__all__ = ["SLatFlowModel"]


class SLatFlowModel(nn.Module):
    """Flow transformer on sparse voxel latents, conditioned on image tokens.

    ``forward(x: SparseTensor [N, in - concat], t [B] (already ×1000), cond [B, L, cond_channels],
    concat_cond: SparseTensor | None)`` → ``SparseTensor [N, out]`` with the same rows and coords.
    ``resolution`` is accepted for config compatibility; the forward does not use it.
    """

    def __init__(self, resolution: int, in_channels: int, model_channels: int, cond_channels: int,
                 out_channels: int, num_blocks: int, num_heads: int | None = None,
                 num_head_channels: int | None = 64, mlp_ratio: float = 4,
                 pe_mode: Literal["ape", "rope"] = "ape",
                 rope_freq: tuple[float, float] = (1.0, 10000.0), dtype: str = "float32",
                 use_checkpoint: bool = False, share_mod: bool = False,
                 initialization: str = "vanilla", qk_rms_norm: bool = False,
                 qk_rms_norm_cross: bool = False, **kwargs: Any):
        super().__init__()
        if pe_mode != "rope":
            raise NotImplementedError("only pe_mode='rope' is used by TRELLIS.2")
        self.resolution = resolution
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.cond_channels = cond_channels
        self.out_channels = out_channels
        self.num_blocks = num_blocks
        self.num_heads = num_heads or model_channels // num_head_channels
        self.mlp_ratio = mlp_ratio
        self.pe_mode = pe_mode
        self.rope_freq = tuple(rope_freq)
        self.share_mod = share_mod
        self.dtype = str_to_dtype(dtype)

        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels))
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.blocks = nn.ModuleList([
            ModulatedSparseTransformerCrossBlock(
                model_channels, cond_channels, num_heads=self.num_heads, mlp_ratio=mlp_ratio,
                use_rope=True, rope_freq=self.rope_freq, share_mod=share_mod,
                qk_rms_norm=qk_rms_norm, qk_rms_norm_cross=qk_rms_norm_cross)
            for _ in range(num_blocks)
        ])
        self.out_layer = nn.Linear(model_channels, out_channels)
        convert_linear_to(self.blocks, self.dtype)

    @property
    def device(self) -> torch.device:
        return self.input_layer.weight.device

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
        mod = self.t_embedder(t)
        if self.share_mod:
            mod = self.adaLN_modulation(mod)
        mod = mod.to(self.dtype)
        cond = cond.to(self.dtype)
        h.layout  # compute the per-item row slices once; every replace() below reuses them
        sparse_rope_phases(h, self.model_channels // self.num_heads, self.rope_freq)  # fill the cache once
        for block in self.blocks:
            h = block(h, mod, cond)
        out = F.layer_norm(h.feats.to(x.feats.dtype), h.feats.shape[-1:])
        return x.replace(self.out_layer(out))
