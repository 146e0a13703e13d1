"""Golden handlers for the O-Voxel mesh extraction (``fdg_mesh_sphere``), run by the numpy codec."""

from __future__ import annotations

import torch

from . import GoldenCase, case
from ..ovoxel import flexible_dual_grid_to_mesh


@case("fdg_mesh_sphere",
      call=('v, f = flexible_dual_grid_to_mesh(coords, dual_vertices, intersected, split_weight or None, '
            'aabb=[[-0.5]*3,[0.5]*3], grid_size=64, train=False)'))
def fdg_mesh_sphere(gc: GoldenCase) -> dict[str, torch.Tensor]:
    """Official ``flexible_dual_grid_to_mesh`` on the ground-truth sphere grid, with and without γ."""
    t = gc.tensors
    coords = t["in.coords"].numpy()
    dual = t["in.dual_vertices"].numpy()
    flags = t["in.intersected"].numpy()
    gamma = t["in.split_weight"].numpy()
    grid = int(gc.meta.get("grid_size", 64))
    aabb = [[-0.5] * 3, [0.5] * 3]
    out = {}
    for name, sw in (("split", gamma), ("nosplit", None)):
        v, f = flexible_dual_grid_to_mesh(coords, dual, flags, sw, aabb=aabb, grid_size=grid)
        out[f"out.{name}_vertices"] = torch.from_numpy(v)
        out[f"out.{name}_faces"] = torch.from_numpy(f)
    return out
