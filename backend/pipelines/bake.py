"""Texture baking for the pipelines: mesh/UV checks, UV creation (xatlas), device-aware attribute
sampling, and :func:`bake_pbr` on top of the numpy UV-space primitives in ``backend.ovoxel.uvbake``.

No GPU rasteriser needed. Texture images use the glTF/PIL
convention: pixel row 0 is the top of the image, i.e. UV ``v = 1``; texel ``(row, col)`` has its
centre at ``u = (col + 0.5) / W``, ``v = 1 − (row + 0.5) / H``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BadInput
from ..ovoxel.uvbake import bake_attributes

__all__ = ["validate_mesh", "corner_uvs", "unwrap_uvs", "sample_voxel_attributes", "bake_pbr"]


def validate_mesh(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``float64 [V, 3]`` vertices and ``int64 [F, 3]`` faces; :class:`BadInput` otherwise."""
    try:
        v = np.asarray(vertices, dtype=np.float64)
        f = np.asarray(faces)
    except (TypeError, ValueError) as e:
        raise BadInput(f"mesh arrays are not numeric: {e}") from e
    if v.ndim != 2 or v.shape[1] != 3 or v.shape[0] == 0:
        raise BadInput(f"the mesh has no vertices (vertices shape {v.shape}); it cannot be textured.")
    if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] == 0:
        raise BadInput(f"the mesh has no triangles (faces shape {f.shape}); it cannot be textured.")
    if not np.issubdtype(f.dtype, np.integer):
        raise BadInput("mesh face indices must be integers.")
    f = f.astype(np.int64)
    if f.min() < 0 or f.max() >= v.shape[0]:
        raise BadInput(f"mesh face indices out of range [0, {v.shape[0]}).")
    if not np.isfinite(v).all():
        raise BadInput("the mesh has NaN or infinite vertex coordinates; fix the geometry first.")
    ext = np.ptp(v[np.unique(f)], axis=0)
    if float(ext.max()) <= 0:
        raise BadInput("the mesh is degenerate (all vertices at one point).")
    return v, f


def corner_uvs(uvs: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Per-face-corner UVs ``float64 [F, 3, 2]`` from per-vertex ``[V, 2]`` or per-corner ``[F, 3, 2]``."""
    u = np.asarray(uvs, dtype=np.float64)
    if u.ndim == 3 and u.shape[1:] == (3, 2) and u.shape[0] == faces.shape[0]:
        out = u
    elif u.ndim == 2 and u.shape[1] == 2:
        if u.shape[0] <= faces.max():
            raise BadInput(f"per-vertex UVs have {u.shape[0]} rows but the mesh uses vertex {faces.max()}.")
        out = u[faces]
    else:
        raise BadInput(f"UVs must be [V, 2] per vertex or [F, 3, 2] per face corner, got {u.shape}.")
    if not np.isfinite(out).all():
        raise BadInput("the mesh UVs contain NaN or infinite values.")
    return out


def unwrap_uvs(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Create a UV atlas with xatlas: ``(vertex_map [V'], faces' [F, 3], uvs' [V', 2])``.

    Vertices are split at seams; ``vertices[vertex_map]`` gives the new vertex positions.
    """
    try:
        import xatlas
    except ImportError as e:  # pragma: no cover - pinned in requirements.txt
        raise BadInput("the mesh has no UVs and xatlas (UV unwrapping) is not installed: pip install "
                       "xatlas==0.0.11, or unwrap the mesh in Blender first.") from e
    vmap, new_faces, uvs = xatlas.parametrize(np.ascontiguousarray(vertices, np.float32),
                                              np.ascontiguousarray(faces, np.uint32))
    return vmap.astype(np.int64), new_faces.astype(np.int64), uvs.astype(np.float64)


def sample_voxel_attributes(coords: np.ndarray, attrs: np.ndarray, resolution: int, points: np.ndarray,
                            device: Any = None) -> np.ndarray:
    """Sparse trilinear sampling with the official renormalisation (codec semantics) at unit-cube points.

    On a CUDA ``device`` this runs the GPU twin in ``kernels`` (Triton kernel or its torch reference,
    chosen by the kernel registry); everywhere else the numpy codec's
    ``backend.ovoxel.sample_attributes``, which is the faster of the two on a CPU.
    """
    if device is not None and str(device).startswith("cuda"):
        import torch

        import kernels

        dev = torch.device(device)
        out = kernels.sample_attributes(torch.as_tensor(np.asarray(coords, np.int32), device=dev),
                                        torch.as_tensor(np.asarray(attrs, np.float32), device=dev), int(resolution),
                                        None, torch.as_tensor(np.asarray(points, np.float32), device=dev))
        return out.float().cpu().numpy()
    from .. import ovoxel

    return ovoxel.sample_attributes(np.asarray(coords, np.int32), np.asarray(attrs, np.float32), int(resolution),
                                    ovoxel.DEFAULT_AABB, np.asarray(points, np.float32))


def bake_pbr(unit_vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, coords: np.ndarray, attrs: np.ndarray,
             resolution: int, size: int, device: Any = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Bake O-Voxel PBR attributes into UV space.

    Args:
        unit_vertices: ``[V, 3]`` positions in the O-Voxel frame (``[-0.5, 0.5]³``).
        faces: ``[F, 3]``; uv: ``[F, 3, 2]`` per-corner UVs.
        coords / attrs: the attribute voxels (``[N, 3]`` int, ``[N, 6]`` float) at ``resolution``.
        size: texture size.
    Returns:
        ``(base_color RGBA uint8, metallicRoughness uint8, coverage)``; every texel a triangle covers
        gets the sparse-trilinear sample at its barycentric 3D position, the rest the nearest one.
    """
    try:
        return bake_attributes(unit_vertices, faces, uv, size,
                               lambda pts: sample_voxel_attributes(coords, attrs, resolution, pts, device))
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
