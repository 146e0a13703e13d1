"""``SparseStructureFlowModel``: the dense DiT of stage 1 (sparse-structure latent, 16³ × 8).

Same parameter names and shapes as ``trellis2/models/sparse_structure_flow.py``. The RoPE phase table
(official persistent buffer ``rope_phases``, absent from the HF files) is a non-persistent buffer
here, regenerated from the config.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.attention import RotaryPositionEmbedder
from ..modules.transformer import (ModulatedTransformerCrossBlock, TimestepEmbedder,
                                   convert_linear_to, str_to_dtype)

__all__ = ["SparseStructureFlowModel", "grid_positions"]


def grid_positions(resolution: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[R³, 3]`` integer ``(x, y, z)`` of the flattened grid, token index ``x·R² + y·R + z``."""
    r = torch.arange(resolution, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)


class SparseStructureFlowModel(nn.Module):
    """Flow transformer on a dense ``[B, C, R, R, R]`` latent, conditioned on image tokens.

    ``forward(x [B, in, R, R, R], t [B] (already ×1000), cond [B, L, cond_channels])`` →
    ``[B, out, R, R, R]``.
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
            ModulatedTransformerCrossBlock(
                model_channels, cond_channels, num_heads=self.num_heads, mlp_ratio=mlp_ratio,
                use_rope=True, rope_freq=self.rope_freq, share_mod=share_mod,
                qk_rms_norm=qk_rms_norm, qk_rms_norm_cross=qk_rms_norm_cross)
            for _ in range(num_blocks)
        ])
        self.out_layer = nn.Linear(model_channels, out_channels)
        self.pos_embedder = RotaryPositionEmbedder(model_channels // self.num_heads, 3, self.rope_freq)
        self.register_buffer("rope_phases", self._make_phases(self.input_layer.weight.device),
                             persistent=False)
        convert_linear_to(self.blocks, self.dtype)

    def _make_phases(self, device: torch.device) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(self.resolution ** 3, self.model_channels // self.num_heads // 2,
                               dtype=torch.complex64, device="meta")
        return self.pos_embedder(grid_positions(self.resolution, device))

    def init_non_persistent_buffers(self, device: torch.device | str) -> None:
        """Regenerate ``rope_phases`` (called by the checkpoint loader after materialising)."""
        self.rope_phases = self._make_phases(torch.device(device))

    @property
    def device(self) -> torch.device:
        return self.input_layer.weight.device

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        R = self.resolution
        if list(x.shape) != [B, self.in_channels, R, R, R]:
            raise ValueError(f"input shape {list(x.shape)}, expected {[B, self.in_channels, R, R, R]}")
        h = self.input_layer(x.reshape(B, C, -1).permute(0, 2, 1))
        mod = self.t_embedder(t)
        if self.share_mod:
            mod = self.adaLN_modulation(mod)
        mod = mod.to(self.dtype)
        h = h.to(self.dtype)
        cond = cond.to(self.dtype)
        phases = self.rope_phases
        if phases.device != h.device:
            phases = phases.to(h.device)
        for block in self.blocks:
            h = block(h, mod, cond, phases)
        h = F.layer_norm(h.to(x.dtype), h.shape[-1:])
        h = self.out_layer(h)
        return h.permute(0, 2, 1).reshape(B, self.out_channels, R, R, R)
