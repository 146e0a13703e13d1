"""One O-Voxel -> asset decoder for every consumer (``trellis2 ovoxel decode``, Blender's importer).

:func:`decode_asset` = geometry (:func:`decode_ovoxel`, oriented), the official post-decode hole
filling, area-weighted vertex normals, per-vertex PBR attributes (sparse trilinear, nearest present
voxel where no voxel is near) and the source frame restored from the stored normalisation.
:func:`to_blender_frame` maps a decoded asset into Blender's Z-up frame and :func:`grid_points` maps
points of the imported object back into the O-Voxel grid (texture baking). numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ._types import OVoxel
from .decode import decode_ovoxel
from .meshutil import fill_small_holes
from .pbr import AttributeSampler

#: Official post-decode hole filling: loops shorter than 3 % of the box size.
HOLE_PERIMETER = 0.03
#: Source formats whose convention is Y-up (glTF by spec; OBJ by the common / Blender default).
Y_UP_FORMATS = (".glb", ".gltf", ".obj")


@dataclass
class DecodedAsset:
    """A decoded O-Voxel. ``vertices`` float32 ``[V, 3]`` and ``normals`` (unit, float32) in the frame
    named by ``frame`` ("source": the encoded mesh's own coordinates, "normalized": the O-Voxel
    unit cube); ``faces`` int32 ``[F, 3]``; ``attrs`` float32 ``[V, 6]`` (:data:`ATTR_LAYOUT`, base
    colour sRGB-encoded) or None; ``up_axis`` "Y" or "Z" of that frame; ``meta`` the O-Voxel's meta."""

    vertices: np.ndarray
    faces: np.ndarray
    normals: np.ndarray
    attrs: Optional[np.ndarray]
    frame: str
    up_axis: str
    meta: dict = field(default_factory=dict)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray, chunk: int = 1 << 21) -> np.ndarray:
    """Area-weighted unit vertex normals (float32 ``[V, 3]``; +Z where they cancel or no face has area,
    so every normal is a unit vector as glTF requires). Per-component float32 face normals in chunks,
    summed per vertex with ``bincount``."""
    v = np.asarray(vertices, np.float32).reshape(-1, 3)
    f = np.asarray(faces).reshape(-1, 3)
    nv = v.shape[0]
    cols = [np.ascontiguousarray(v[:, d]) for d in range(3)]
    acc = np.zeros((3, nv))
    for a in range(0, f.shape[0], chunk):
        fc = f[a:a + chunk]
        i0, i1, i2 = (np.ascontiguousarray(fc[:, k]) for k in range(3))
        p0 = [c[i0] for c in cols]
        e1 = [cols[d][i1] - p0[d] for d in range(3)]
        e2 = [cols[d][i2] - p0[d] for d in range(3)]
        for d in range(3):
            b, c = (d + 1) % 3, (d + 2) % 3
            nd = e1[b] * e2[c] - e1[c] * e2[b]
            for idx in (i0, i1, i2):
                acc[d] += np.bincount(idx, nd, minlength=nv)
    n = acc.T
    ln = np.sqrt((n * n).sum(1))
    out = np.empty((nv, 3), np.float32)
    np.divide(n, np.where(ln > 0, ln, 1.0)[:, None], out=out, casting="unsafe")
    out[~(ln > 0)] = (0.0, 0.0, 1.0)
    return out


def source_up_axis(meta: dict) -> str:
    """"Y" or "Z": the up axis of the mesh the O-Voxel was encoded from (``meta["up_axis"]`` as the
    encoder records it, else guessed from the source file's extension, else "Z")."""
    up = str(meta.get("up_axis") or "").upper()
    if up in ("Y", "Z"):
        return up
    src = str(meta.get("source") or "").lower()
    return "Y" if src.endswith(Y_UP_FORMATS) else "Z"


def decode_asset(ov: OVoxel, *, fill_holes: bool = True, frame: str = "source", official: bool = False,
                 pbr: bool = True) -> DecodedAsset:
    """Decode ``ov`` into a mesh with normals and per-vertex PBR attributes.

    Args:
        fill_holes: close boundary loops shorter than :data:`HOLE_PERIMETER` x the box size (official).
        frame: "source" maps back to the encoded mesh's coordinates with ``meta["normalization"]``
            (when the encoder normalised); "normalized" keeps the O-Voxel's own frame.
        official: the official geometry (no orientation fix, every vertex kept; no hole filling).
        pbr: sample ``ov.attrs`` at the vertices (hole-filling vertices outside every voxel get the
            nearest present voxel's values, never zeros).
    """
    if frame not in ("source", "normalized"):
        raise ValueError(f"frame must be 'source' or 'normalized', got {frame!r}")
    v, f = decode_ovoxel(ov, official=official)
    if fill_holes and not official and f.shape[0]:
        extent = float(np.min(ov.aabb[1] - ov.aabb[0]))
        v, f = fill_small_holes(v, f, HOLE_PERIMETER * extent)
    v = np.asarray(v, np.float32)
    f = np.asarray(f, np.int32)
    attrs = None
    if pbr and ov.attrs is not None and v.shape[0]:
        attrs = AttributeSampler(ov.coords, ov.attrs, ov.resolution, ov.aabb).sample(v, fallback="nearest")
    normals = vertex_normals(v, f)
    norm = ov.meta.get("normalization")
    if frame == "source" and norm:
        center = (ov.aabb[0] + ov.aabb[1]) / 2
        v = ((v.astype(np.float64) - center) / float(norm["scale"]) + np.asarray(norm["center"])).astype(np.float32)
    else:
        frame = "normalized" if norm else frame
    return DecodedAsset(v, f, normals, attrs, frame, source_up_axis(ov.meta), dict(ov.meta))


def to_blender_frame(points: np.ndarray, up_axis: str) -> np.ndarray:
    """Points (or normals) of a Y-up frame in Blender's Z-up frame: ``(x, y, z) -> (x, -z, y)``, the
    rotation Blender's glTF / OBJ importers apply; a Z-up frame is returned unchanged."""
    p = np.asarray(points, np.float32)
    if str(up_axis).upper() != "Y":
        return p
    return np.ascontiguousarray(np.stack([p[:, 0], -p[:, 2], p[:, 1]], 1))


def from_blender_frame(points: np.ndarray, up_axis: str) -> np.ndarray:
    """Inverse of :func:`to_blender_frame`: ``(x, y, z) -> (x, z, -y)`` for a Y-up frame."""
    p = np.asarray(points, np.float64)
    if str(up_axis).upper() != "Y":
        return p
    return np.stack([p[:, 0], p[:, 2], -p[:, 1]], 1)


def grid_points(points: np.ndarray, *, up_axis: str, normalization: Optional[dict], aabb, restored: bool
                ) -> np.ndarray:
    """Points of an imported object (Blender frame, object space) in the O-Voxel grid's frame: undo the
    Y-up -> Z-up turn and, when the import ``restored`` the source's size and place, the normalisation."""
    p = from_blender_frame(points, up_axis)
    if restored and normalization:
        box = np.asarray(aabb, np.float64).reshape(2, 3)
        p = (p - np.asarray(normalization["center"], np.float64)) * float(normalization["scale"]) + box.mean(0)
    return p.astype(np.float32)
