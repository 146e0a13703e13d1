"""``SparseStructureFlowModel``: the dense DiT of stage 1 (sparse-structure latent, 16³ × 8).

Same parameter names and shapes as ``trellis2/models/sparse_structure_flow.py``. The RoPE phase table
(official persistent buffer ``rope_phases``, absent from the HF files) is a non-persistent buffer
here, regenerated from the config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modules.attention import RotaryPositionEmbedder
from ..modules.transformer import ModulatedTransformerCrossBlock
from .flow_transformer import FlowTransformerBase

__all__ = ["SparseStructureFlowModel", "grid_positions"]


def grid_positions(resolution: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[R³, 3]`` integer ``(x, y, z)`` of the flattened grid, token index ``x·R² + y·R + z``."""
    r = torch.arange(resolution, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)


class SparseStructureFlowModel(FlowTransformerBase):
    """Flow transformer on a dense ``[B, C, R, R, R]`` latent, conditioned on image tokens.

    ``forward(x [B, in, R, R, R], t [B] (already ×1000), cond [B, L, cond_channels])`` →
    ``[B, out, R, R, R]``.
    """

    block_cls = ModulatedTransformerCrossBlock

    def _init_position_embedding(self) -> None:
        """``pos_embedder`` and the non-persistent phase table ``rope_phases [R³, D/2]`` of the grid."""
        self.pos_embedder = RotaryPositionEmbedder(self.model_channels // self.num_heads, 3, self.rope_freq)
        self.register_buffer("rope_phases", self._make_phases(self.input_layer.weight.device),
                             persistent=False)

    def _make_phases(self, device: torch.device) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(self.resolution ** 3, self.model_channels // self.num_heads // 2,
                               dtype=torch.complex64, device="meta")
        return self.pos_embedder(grid_positions(self.resolution, device))

    def init_non_persistent_buffers(self, device: torch.device | str) -> None:
        """Regenerate ``rope_phases`` (called by the checkpoint loader after materialising)."""
        self.rope_phases = self._make_phases(torch.device(device))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        R = self.resolution
        if list(x.shape) != [B, self.in_channels, R, R, R]:
            raise ValueError(f"input shape {list(x.shape)}, expected {[B, self.in_channels, R, R, R]}")
        h = self.input_layer(x.reshape(B, C, -1).permute(0, 2, 1))
        mod = self.timestep_modulation(t)
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
