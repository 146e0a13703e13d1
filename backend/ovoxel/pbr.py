"""PBR attributes: textured mesh -> voxel attributes, and sparse trilinear sampling (numpy only)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._types import DEFAULT_AABB


def voxelize_pbr(mesh, coords: np.ndarray, resolution: int, aabb: Any = DEFAULT_AABB, *,
                 mipmap: bool = True, return_mask: bool = False):
    """Textured :class:`MeshData` -> float32 ``attrs [N, 6]`` (:data:`ATTR_LAYOUT`) on the given voxels.

    Official ``textured_mesh_to_volumetric_attr`` semantics: every (triangle, voxel) pair of the
    scan-line (the 4 voxels around each edge crossing, i.e. the same voxel set as the shape
    encoder) contributes the material sampled at the projection of the voxel centre onto the
    triangle plane (barycentrics clamped to the triangle — a documented improvement over the
    official unclamped extrapolation); contributions are averaged with equal weights.
    Sampling: bilinear, half-texel centres, wrap modes, trilinear mip-mapping with level
    ``log2(texels per voxel)`` (any texture size; no power-of-two requirement).
    Channels: base = texture RGB/255 × baseColorFactor × vertex colour (linear ``COLOR_0`` converted to
    sRGB encoding) — sRGB-encoded, no linearisation, as official; metallic = MR.B × metallicFactor;
    roughness = MR.G × roughnessFactor; alpha = base A × factor A × vertex A for MASK
    (then ``< cutoff -> 0 else 1``) and BLEND, 1 for OPAQUE.

    ``mesh.vertices`` must be in the same frame as ``aabb``. Voxels that no triangle touches get
    the value of the nearest touched voxel (or the default material if none); ``return_mask=True``
    also returns the bool ``[N]`` mask of touched voxels.
    """
    raise NotImplementedError


def sample_attributes(coords: np.ndarray, attrs: np.ndarray, resolution: int, aabb: Any,
                      points: np.ndarray) -> np.ndarray:
    """Sparse trilinear sampling at world ``points [P, 3]`` -> ``[P, C]`` float32 (official ``grid_sample_3d``).

    Voxel values sit at centres ``aabb[0] + (coords + 0.5) * s``. For each point the 8 surrounding
    voxel centres are weighted trilinearly; **only existing voxels count and the weights are
    renormalised** over them; points with no existing neighbour get 0.
    """
    return AttributeSampler(coords, attrs, resolution, aabb).sample(points)


class AttributeSampler:
    """:func:`sample_attributes` with the voxel index built once (for repeated / chunked queries)."""

    def __init__(self, coords: np.ndarray, attrs: np.ndarray, resolution: int, aabb: Any = DEFAULT_AABB):
        raise NotImplementedError

    def sample(self, points: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
        """``[P, C]`` float32 samples at world ``points [P, 3]`` (processed in chunks of ``chunk``)."""
        raise NotImplementedError
