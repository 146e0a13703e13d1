"""Flexible-dual-grid shape SC-VAE (``trellis2/models/sc_vaes/fdg_vae.py``).

The encoder feeds ``[vertices − 0.5, intersected − 0.5]`` (6 channels) to the SC-VAE encoder. The
decoder's 7 output channels go through the FDG head (:func:`fdg_head`):

* ``dual_vertices = (1 + 2m)·sigmoid(h[:, 0:3]) − m`` with ``m = voxel_margin`` (0.5 → ``2σ − 0.5``),
* ``intersected = h[:, 3:6] > 0``,
* ``split_weight = softplus(h[:, 6:7])``,

and then through the O-Voxel mesh extraction on a ``resolution``³ grid over ``[−0.5, 0.5]³``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ...modules.sparse import SparseHierarchy, SparseTensor
from .sparse_unet_vae import SparseUnetVaeDecoder, SparseUnetVaeEncoder

__all__ = ["FlexiDualGridVaeEncoder", "FlexiDualGridVaeDecoder", "FDGFields", "fdg_head"]


class FDGFields(NamedTuple):
    """Per-voxel flexible-dual-grid fields decoded from the 7 output channels."""

    dual_vertices: SparseTensor   # [N, 3] float, voxel-local
    intersected: SparseTensor     # [N, 3] bool
    split_weight: SparseTensor    # [N, 1] float > 0


def fdg_head(h: SparseTensor, voxel_margin: float = 0.5) -> FDGFields:
    """The FDG head on the raw decoder output ``h [N, 7]`` (thresholds evaluated in fp32)."""
    f = h.feats.float()
    vertices = (1 + 2 * voxel_margin) * torch.sigmoid(f[:, 0:3]) - voxel_margin
    intersected = f[:, 3:6] > 0
    split = F.softplus(f[:, 6:7])
    return FDGFields(h.replace(vertices.to(h.dtype)), h.replace(intersected), h.replace(split.to(h.dtype)))


class FlexiDualGridVaeEncoder(SparseUnetVaeEncoder):
    """Shape encoder: ``forward(vertices, intersected, ...)`` with ``vertices [N,3]`` in [0,1], ``intersected [N,3]`` bool."""

    def __init__(self, model_channels: Sequence[int], latent_channels: int, num_blocks: Sequence[int],
                 block_type: Sequence[str], down_block_type: Sequence[str],
                 block_args: Sequence[dict[str, Any]], use_fp16: bool = False) -> None:
        super().__init__(6, model_channels, latent_channels, num_blocks, block_type, down_block_type,
                         block_args, use_fp16)

    def forward(self, vertices: SparseTensor, intersected: SparseTensor,  # type: ignore[override]
                sample_posterior: bool = False, return_raw: bool = False,
                return_hierarchy: bool = False, generator: torch.Generator | None = None) -> Any:
        x = vertices.replace(torch.cat([vertices.feats - 0.5, intersected.feats.to(vertices.dtype) - 0.5], 1))
        return super().forward(x, sample_posterior, return_raw, return_hierarchy, generator)


class FlexiDualGridVaeDecoder(SparseUnetVaeDecoder):
    """Shape decoder: SC-VAE decoder (7 channels, predicted subdivisions) + FDG head + mesh extraction."""

    def __init__(self, resolution: int, model_channels: Sequence[int], latent_channels: int,
                 num_blocks: Sequence[int], block_type: Sequence[str], up_block_type: Sequence[str],
                 block_args: Sequence[dict[str, Any]], voxel_margin: float = 0.5, use_fp16: bool = False) -> None:
        super().__init__(7, model_channels, latent_channels, num_blocks, block_type, up_block_type,
                         block_args, use_fp16)
        self.resolution = resolution
        self.voxel_margin = voxel_margin

    def set_resolution(self, resolution: int) -> None:
        self.resolution = resolution

    def decode_raw(self, x: SparseTensor, return_subs: bool = False) -> Any:
        """The raw 7-channel output (``SparseUnetVaeDecoder.forward``), optionally with the subdivision logits."""
        return SparseUnetVaeDecoder.forward(self, x, return_subs=return_subs)

    def decode_fields(self, x: SparseTensor, return_subs: bool = False) -> Any:
        """``FDGFields`` (and the subdivision logits when ``return_subs``)."""
        out = self.decode_raw(x, return_subs)
        h, subs = out if return_subs else (out, None)
        fields = fdg_head(h, self.voxel_margin)
        return (fields, subs) if return_subs else fields

    def extract_meshes(self, fields: FDGFields) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch item ``(vertices [V,3] float32, faces [F,3] int32)`` in the official quad order."""
        from ...ovoxel import flexible_dual_grid_to_mesh  # numpy codec, official-compatible mode

        meshes = []
        for v, i, q in zip(fields.dual_vertices.unbind(), fields.intersected.unbind(),
                           fields.split_weight.unbind()):
            verts, faces = flexible_dual_grid_to_mesh(
                v.coords[:, 1:].cpu().numpy(), v.feats.float().cpu().numpy(), i.feats.cpu().numpy(),
                q.feats.float().cpu().numpy(), aabb=[[-0.5] * 3, [0.5] * 3], grid_size=self.resolution)
            meshes.append((torch.as_tensor(verts, dtype=torch.float32), torch.as_tensor(faces).to(torch.int32)))
        return meshes

    def forward(self, x: SparseTensor, return_subs: bool = False, **kwargs: Any) -> Any:  # type: ignore[override]
        """Meshes (list of ``(vertices, faces)``), plus the subdivision logits when ``return_subs``."""
        out = self.decode_fields(x, return_subs=return_subs)
        fields, subs = out if return_subs else (out, None)
        meshes = self.extract_meshes(fields)
        return (meshes, subs) if return_subs else meshes
