"""Texture baking in UV space: per-texel rasterisation, barycentric positions, dilation fill, UV creation.

All numpy (vectorised, chunked); no GPU rasteriser needed. Texture images use the glTF/PIL
convention: pixel row 0 is the top of the image, i.e. UV ``v = 1``; texel ``(row, col)`` has its
centre at ``u = (col + 0.5) / W``, ``v = 1 − (row + 0.5) / H``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BadInput

__all__ = ["validate_mesh", "corner_uvs", "rasterize_uv", "fill_empty_texels", "unwrap_uvs", "pack_pbr_textures",
           "bake_pbr"]


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


def rasterize_uv(uv: np.ndarray, size: int, chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Which triangle covers each texel centre, and where.

    Args:
        uv: ``[F, 3, 2]`` per-corner UVs (wrapped coordinates outside [0,1] are not tiled).
        size: texture width = height.
    Returns:
        ``face [H, W] int64`` (−1 = empty) and ``bary [H, W, 3] float32``. Later faces win overlaps.
    """
    H = W = int(size)
    face_img = np.full((H, W), -1, np.int64)
    bary_img = np.zeros((H, W, 3), np.float32)
    # triangle corners in texel space (x right, y down)
    px = uv[:, :, 0] * W - 0.5
    py = (1.0 - uv[:, :, 1]) * H - 0.5
    x0 = np.clip(np.ceil(px.min(1)), 0, W - 1).astype(np.int64)
    x1 = np.clip(np.floor(px.max(1)), 0, W - 1).astype(np.int64)
    y0 = np.clip(np.ceil(py.min(1)), 0, H - 1).astype(np.int64)
    y1 = np.clip(np.floor(py.max(1)), 0, H - 1).astype(np.int64)
    inside_img = (px.max(1) >= 0) & (px.min(1) <= W - 1) & (py.max(1) >= 0) & (py.min(1) <= H - 1)
    bw = np.where(inside_img, np.maximum(x1 - x0 + 1, 0), 0)
    bh = np.where(inside_img, np.maximum(y1 - y0 + 1, 0), 0)
    area = bw * bh
    ax, ay = px[:, 0], py[:, 0]
    e1x, e1y = px[:, 1] - ax, py[:, 1] - ay
    e2x, e2y = px[:, 2] - ax, py[:, 2] - ay
    det = e1x * e2y - e2x * e1y
    valid = (area > 0) & (np.abs(det) > 1e-12)
    idx = np.nonzero(valid)[0]
    if idx.size == 0:
        return face_img, bary_img
    cum = np.cumsum(area[idx])
    start = 0
    while start < idx.size:
        # faces idx[start:stop] with about `chunk` candidate texels
        base = cum[start - 1] if start else 0
        stop = int(np.searchsorted(cum, base + chunk, side="right"))
        stop = max(stop, start + 1)
        fi = idx[start:stop]
        counts = area[fi]
        rep = np.repeat(np.arange(fi.size), counts)
        offs = np.arange(rep.size) - np.repeat(np.cumsum(counts) - counts, counts)
        f = fi[rep]
        tx = x0[f] + offs % bw[f]
        ty = y0[f] + offs // bw[f]
        dx, dy = tx - ax[f], ty - ay[f]
        inv = 1.0 / det[f]
        b1 = (dx * e2y[f] - e2x[f] * dy) * inv
        b2 = (e1x[f] * dy - dx * e1y[f]) * inv
        b0 = 1.0 - b1 - b2
        eps = -1e-7
        ok = (b0 >= eps) & (b1 >= eps) & (b2 >= eps)
        face_img[ty[ok], tx[ok]] = f[ok]
        bary_img[ty[ok], tx[ok]] = np.stack([b0[ok], b1[ok], b2[ok]], -1)
        start = stop
    return face_img, bary_img


def fill_empty_texels(img: np.ndarray, filled: np.ndarray, margin: int | None = None) -> np.ndarray:
    """Fill empty texels with the value of the nearest filled texel (dilation to convergence).

    ``margin`` limits the fill to that many texels from a filled one (None = everything), so
    mip-mapping and bilinear filtering never pull in black at UV seams.
    """
    from scipy import ndimage

    if filled.all() or not filled.any():
        return img
    dist, (iy, ix) = ndimage.distance_transform_edt(~filled, return_indices=True)
    out = img[iy, ix]
    if margin is not None:
        far = dist > margin
        out[far] = img[far]
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


def pack_pbr_textures(attr_img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[H, W, 6]`` float attributes → ``(base_color RGBA uint8, metallicRoughness uint8 (0, R, M))``."""
    a = np.clip(attr_img * 255, 0, 255).astype(np.uint8)
    base = np.concatenate([a[..., 0:3], a[..., 5:6]], axis=-1)
    mr = np.zeros(a.shape[:2] + (3,), np.uint8)
    mr[..., 1] = a[..., 4]
    mr[..., 2] = a[..., 3]
    return base, mr


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
    face_img, bary = rasterize_uv(uv, size)
    filled = face_img >= 0
    if not filled.any():
        raise BadInput("the mesh UVs cover no texel of the texture (all UVs outside [0, 1] or degenerate).")
    tri = np.asarray(unit_vertices, np.float64)[np.asarray(faces)[face_img[filled]]]      # [T, 3, 3]
    pos = np.einsum("tk,tkc->tc", bary[filled].astype(np.float64), tri)
    sampled = sample_voxel_attributes(coords, attrs, resolution, pos.astype(np.float32), device)
    img6 = np.zeros((size, size, np.asarray(attrs).shape[1]), np.float32)
    img6[filled] = sampled
    img6 = fill_empty_texels(img6, filled)
    base, mr = pack_pbr_textures(img6)
    return base, mr, float(filled.mean())
