"""Blockout-guided generation: a rough mesh decides the sparse structure (the silhouette), the image the rest.

The guide mesh is brought into the generation frame exactly as the texturing path normalises a mesh
(world transform applied, Y-up files turned Z-up, centred on its bounding-box centre and scaled by
``0.99999 / max extent`` into the unit cube) and its surface is voxelised at the sparse-structure grid
(the voxels the surface passes through, as the occupancy the first flow produces). Then:

* strength 1: the sparse structure *is* that occupancy (the first flow does not run);
* strength s < 1 (SDEdit): the occupancy is encoded with the TRELLIS v1 sparse-structure encoder
  (``ss_enc_conv3d_16l8_fp16``, posterior mean), noised to time ``s`` with the run's own SS noise draw
  (``x_s = (1 − s)·x0 + (σ_min + (1 − σ_min)·s)·ε``) and denoised from ``s`` to 0 with the image
  conditioning, so proportions follow the blockout while details come from the image.

The result comes back in the unit cube; ``center`` / ``scale`` map it back onto the blockout
(``world = unit / scale + center``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BadInput

__all__ = ["GuideMesh", "prepare_guide", "GUIDE_FRAMES"]


@dataclass
class GuideMesh:
    """A normalised blockout: unit-cube vertices/faces, its frame and the guidance strength."""

    vertices: np.ndarray   # float32 [V, 3], inside [-0.5, 0.5]³
    faces: np.ndarray      # int64 [F, 3]
    center: np.ndarray     # float64 [3], world bbox centre
    scale: float           # world → unit factor
    strength: float = 1.0

    def occupancy(self, grid: int) -> np.ndarray:
        """``int32 [M, 3]`` voxels of a ``grid³`` lattice the surface passes through."""
        from .. import ovoxel

        try:
            enc = ovoxel.encode_shape(self.vertices, self.faces, grid, outside="clip")
        except ovoxel.OVoxelError as e:
            raise BadInput(f"the guide mesh cannot be voxelised: {e}") from e
        coords = np.asarray(enc.coords, np.int32)
        if len(coords) == 0:
            raise BadInput("the guide mesh produced no voxels (is it flat or tiny?).")
        return coords

    def to_world(self, unit_vertices: np.ndarray) -> np.ndarray:
        """Unit-cube result vertices → the blockout's world frame."""
        return np.asarray(unit_vertices, np.float64) / self.scale + self.center


from ..contract import GUIDE_FRAMES  # noqa: E402  (fit into the unit cube, or already in it)


def prepare_guide(vertices: np.ndarray, faces: np.ndarray, strength: float = 1.0,
                  transform: np.ndarray | None = None, y_up: bool = False, frame: str = "fit") -> GuideMesh:
    """Validate and normalise a blockout mesh (see the module docstring).

    Raises:
        BadInput: empty / NaN / degenerate mesh, a bad transform, a strength outside (0, 1], or (frame
            ``unit``) a guide outside the generation frame.
    """
    from .bake import validate_mesh
    from .texturing import _apply_transform, normalize_to_unit_cube

    try:
        strength = float(strength)
    except (TypeError, ValueError) as e:
        raise BadInput(f"guide strength must be a number in (0, 1], got {strength!r}.") from e
    if not 0.0 < strength <= 1.0 or not np.isfinite(strength):
        raise BadInput(f"guide strength must be in (0, 1], got {strength}.")
    if frame not in GUIDE_FRAMES:
        raise BadInput(f"guide frame must be one of {GUIDE_FRAMES}, got {frame!r}.")
    try:
        v, f = validate_mesh(vertices, faces)
    except BadInput as e:
        raise BadInput(f"guide mesh: {e.message.replace('it cannot be textured', 'it cannot guide a generation')}"
                       ) from e
    world = _apply_transform(np.asarray(v, np.float64), transform, y_up)
    if not np.isfinite(world).all():
        raise BadInput("the guide mesh has non-finite coordinates after its transform.")
    if frame == "unit":
        used = world[np.unique(f)]
        if np.abs(used).max() > 0.5 + 1e-6:
            raise BadInput(f"the guide mesh lies outside the generation frame [-0.5, 0.5]³ (extends to "
                           f"{np.abs(used).max():.3f}); use frame 'fit' to scale it in.")
        return GuideMesh(world.astype(np.float32), f, np.zeros(3), 1.0, strength)
    unit, center, scale = normalize_to_unit_cube(world, f)
    return GuideMesh(unit.astype(np.float32), np.asarray(f, np.int64), np.asarray(center, np.float64), float(scale),
                     strength)
