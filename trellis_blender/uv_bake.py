"""Bake sparse-voxel PBR attributes into UV textures, in numpy (no bpy, no GPU).

Used when a generation result carries O-Voxel attributes but no textures and the user asked for
baked textures: every texel covered by a triangle in UV space gets the attributes sampled at its
barycentric 3D position; empty texels are filled from their neighbours (mip/bleed safety) and then
with the mean colour. Images follow the glTF/PIL convention: row 0 is the top (UV ``v = 1``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

_CHUNK = 1 << 22  # candidate texels per vectorised batch


def rasterize(uv: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which triangle covers each texel, and where.

    Args:
        uv: ``[F, 3, 2]`` per-corner UVs (``v`` up). size: texture size S.
    Returns:
        ``face [S, S] int32`` (-1 where empty) and ``bary [S, S, 3] float32``, rows top-down.
    """
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 3, 2)
    s = int(size)
    face = np.full((s, s), -1, dtype=np.int32)
    bary = np.zeros((s, s, 3), dtype=np.float32)
    p = uv * s - 0.5                                    # texel-centre coordinates
    x0 = np.clip(np.ceil(p[:, :, 0].min(1)), 0, s - 1).astype(np.int64)
    x1 = np.clip(np.floor(p[:, :, 0].max(1)), 0, s - 1).astype(np.int64)
    y0 = np.clip(np.ceil(p[:, :, 1].min(1)), 0, s - 1).astype(np.int64)
    y1 = np.clip(np.floor(p[:, :, 1].max(1)), 0, s - 1).astype(np.int64)
    a, b, c = p[:, 0], p[:, 1], p[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    valid = (np.abs(area) > 1e-12) & (x1 >= x0) & (y1 >= y0) & np.isfinite(area)
    tris = np.nonzero(valid)[0]
    w = (x1 - x0 + 1)[tris]
    h = (y1 - y0 + 1)[tris]
    counts = w * h
    start = 0
    while start < len(tris):
        csum = np.cumsum(counts[start:])
        stop = start + max(1, int(np.searchsorted(csum, _CHUNK, side="right")))
        t = tris[start:stop]
        n = counts[start:stop]
        tid = np.repeat(np.arange(len(t)), n)
        off = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        ww = w[start:stop][tid]
        px = x0[t][tid] + off % ww
        py = y0[t][tid] + off // ww
        ti = t[tid]
        ax, ay = a[ti, 0], a[ti, 1]
        bx, by = b[ti, 0], b[ti, 1]
        cx, cy = c[ti, 0], c[ti, 1]
        ar = area[ti]
        l0 = ((bx - px) * (cy - py) - (by - py) * (cx - px)) / ar
        l1 = ((cx - px) * (ay - py) - (cy - py) * (ax - px)) / ar
        l2 = 1.0 - l0 - l1
        inside = (l0 >= -1e-6) & (l1 >= -1e-6) & (l2 >= -1e-6)
        rows = s - 1 - py[inside]                       # v up → image rows top-down
        cols = px[inside]
        face[rows, cols] = ti[inside]
        bary[rows, cols] = np.stack([l0[inside], l1[inside], l2[inside]], 1)
        start = stop
    return face, bary


def fill_empty(img: np.ndarray, filled: np.ndarray, passes: int = 8) -> np.ndarray:
    """Grow covered texels into empty ones (mean of covered 4-neighbours), then the mean elsewhere."""
    img = img.copy()
    filled = filled.copy()
    for _ in range(passes):
        if filled.all():
            break
        acc = np.zeros_like(img)
        cnt = np.zeros(filled.shape, dtype=np.float32)
        for axis, shift in ((0, 1), (0, -1), (1, 1), (1, -1)):
            acc += np.roll(img * filled[..., None], shift, axis=axis)
            cnt += np.roll(filled, shift, axis=axis)
        grow = (~filled) & (cnt > 0)
        img[grow] = acc[grow] / cnt[grow][:, None]
        filled = filled | grow
    if not filled.all():
        img[~filled] = img[filled].mean(axis=0) if filled.any() else 0.0
    return img


def pack_pbr(attr_img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[S, S, 6]`` attributes in [0, 1] → (base colour RGBA uint8, glTF metal/rough uint8 (0, R, M))."""
    a = (np.clip(attr_img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    base = np.concatenate([a[..., 0:3], a[..., 5:6]], axis=-1)
    mr = np.zeros(a.shape[:2] + (3,), np.uint8)
    mr[..., 1] = a[..., 4]
    mr[..., 2] = a[..., 3]
    return base, mr


def bake(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, size: int,
         sample: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
    """Bake ``sample(points [P, 3]) -> [P, 6]`` over the mesh's UV layout.

    Returns ``(base colour RGBA uint8 [S, S, 4], metallic/roughness uint8 [S, S, 3], coverage)``.
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    face_img, bary = rasterize(uv, size)
    filled = face_img >= 0
    if not filled.any():
        raise ValueError("the UVs cover no texel of the texture")
    tri = v[f[face_img[filled]]]                                   # [T, 3, 3]
    pos = np.einsum("tk,tkc->tc", bary[filled].astype(np.float64), tri).astype(np.float32)
    vals = np.asarray(sample(pos), dtype=np.float32)
    img = np.zeros((size, size, vals.shape[1]), dtype=np.float32)
    img[filled] = vals
    img = fill_empty(img, filled)
    base, mr = pack_pbr(img)
    return base, mr, float(filled.mean())
