"""UV-space baking primitives (numpy only: used by the backend and inside Blender).

Rasterise a mesh's UV layout per texel, sample any attribute field at the texels' barycentric 3D
positions (normally :func:`backend.ovoxel.sample_attributes`), fill empty texels from the nearest
covered one, and pack the 6 O-Voxel PBR channels into glTF images. Images are top-down (row 0 is
UV ``v = 1``), as glTF, PIL and the add-on's image builder expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

__all__ = ["rasterize_uv", "fill_empty_texels", "pack_pbr_textures", "bake_attributes", "UVLayoutStats",
           "uv_layout_stats"]


def _texel_hits(uv: np.ndarray, size: int, chunk: int = 1 << 22) -> Iterator[tuple[np.ndarray, ...]]:
    """Every (triangle, texel centre) pair with the centre inside the triangle, in chunks of about
    ``chunk`` candidates: yields ``(face, ty, tx, b0, b1, b2)`` arrays (x right, y down)."""
    H = W = int(size)
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
        return
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
        yield f[ok], ty[ok], tx[ok], b0[ok], b1[ok], b2[ok]
        start = stop


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
    for f, ty, tx, b0, b1, b2 in _texel_hits(uv, size, chunk):
        face_img[ty, tx] = f
        bary_img[ty, tx] = np.stack([b0, b1, b2], -1)
    return face_img, bary_img


@dataclass(frozen=True)
class UVLayoutStats:
    """How usable a UV layout is as a bake target."""

    in_range: float   # fraction of face corners inside [0, 1]² (tiling / UDIM layouts are far below 1)
    coverage: float   # fraction of texels covered by some triangle
    overlap: float    # fraction of covered texels covered by two or more triangles (stacked / mirrored UVs)

    def problem(self, min_in_range: float = 0.98, max_overlap: float = 0.2, min_coverage: float = 0.02
                ) -> Optional[str]:
        """Why the layout is not a good bake target (None when it is)."""
        if self.in_range < min_in_range:
            return f"{1 - self.in_range:.0%} of its UVs lie outside 0–1 (tiling or UDIM)"
        if self.coverage < min_coverage:
            return f"it covers only {self.coverage:.1%} of the texture"
        if self.overlap > max_overlap:
            return f"{self.overlap:.0%} of its texels are shared by overlapping faces"
        return None


def uv_layout_stats(uv: np.ndarray, size: int = 256) -> UVLayoutStats:
    """:class:`UVLayoutStats` of per-corner UVs ``[F, 3, 2]``, rasterised at ``size``² texel centres."""
    uv = np.asarray(uv, np.float64).reshape(-1, 3, 2)
    if uv.size == 0 or not np.isfinite(uv).all():
        return UVLayoutStats(0.0, 0.0, 0.0)
    tol = 1e-3
    in_range = float(((uv >= -tol) & (uv <= 1 + tol)).all(-1).mean())
    hits = np.zeros(int(size) * int(size), np.int64)
    for _f, ty, tx, *_ in _texel_hits(uv, size):
        hits += np.bincount(ty * int(size) + tx, minlength=hits.size)
    covered = int((hits > 0).sum())
    return UVLayoutStats(in_range, covered / hits.size, float((hits > 1).sum()) / covered if covered else 0.0)


def fill_empty_texels(img: np.ndarray, filled: np.ndarray, margin: Optional[int] = None) -> np.ndarray:
    """Fill empty texels with the value of the nearest filled texel.

    ``margin`` limits the fill to that many texels from a filled one (None = everything), so
    mip-mapping and bilinear filtering never pull in black at UV seams. Uses scipy's exact distance
    transform when scipy is importable, else (inside Blender) 8-neighbour dilation in numpy, which
    copies a nearest (chessboard-distance) filled texel.
    """
    filled = np.asarray(filled, bool)
    if filled.all() or not filled.any():
        return img
    try:
        from scipy import ndimage
    except ImportError:
        return _fill_by_dilation(img, filled, margin)
    dist, (iy, ix) = ndimage.distance_transform_edt(~filled, return_indices=True)
    out = img[iy, ix]
    if margin is not None:
        far = dist > margin
        out[far] = img[far]
    return out


def _fill_by_dilation(img: np.ndarray, filled: np.ndarray, margin: Optional[int]) -> np.ndarray:
    H, W = filled.shape
    src_y, src_x = np.nonzero(filled)
    iy = np.full((H, W), -1, np.int64)
    ix = np.full((H, W), -1, np.int64)
    iy[src_y, src_x], ix[src_y, src_x] = src_y, src_x
    done = filled.copy()
    steps = 0
    while not done.all() and (margin is None or steps < margin):
        steps += 1
        grew = False
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy == 0 and dx == 0:
                    continue
                # neighbour (y+dy, x+dx) of each texel, clipped at the border
                ys = slice(max(dy, 0), H + min(dy, 0))
                xs = slice(max(dx, 0), W + min(dx, 0))
                yd = slice(max(-dy, 0), H + min(-dy, 0))
                xd = slice(max(-dx, 0), W + min(-dx, 0))
                take = ~done[yd, xd] & done[ys, xs]
                if take.any():
                    iy[yd, xd][take] = iy[ys, xs][take]
                    ix[yd, xd][take] = ix[ys, xs][take]
                    grew = True
        if not grew:
            break
        done = iy >= 0
    out = img.copy()
    out[done] = img[iy[done], ix[done]]
    return out


def pack_pbr_textures(attr_img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[H, W, 6]`` attributes in [0, 1] → ``(base_color RGBA uint8, glTF metallicRoughness uint8 (0, R, M))``."""
    a = (np.clip(np.nan_to_num(attr_img), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    base = np.concatenate([a[..., 0:3], a[..., 5:6]], axis=-1)
    mr = np.zeros(a.shape[:2] + (3,), np.uint8)
    mr[..., 1] = a[..., 4]
    mr[..., 2] = a[..., 3]
    return base, mr


def bake_attributes(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, size: int,
                    sample: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
    """Bake ``sample(points float32 [P, 3]) -> [P, 6]`` over the mesh's UV layout ``uv [F, 3, 2]``.

    Every texel a triangle covers gets the sample at its barycentric 3D position, the rest the
    nearest covered texel's. Returns ``(base colour RGBA uint8 [S, S, 4], metallicRoughness uint8
    [S, S, 3], coverage)``; raises ``ValueError`` when the UVs cover no texel.
    """
    face_img, bary = rasterize_uv(np.asarray(uv, np.float64).reshape(-1, 3, 2), size)
    filled = face_img >= 0
    if not filled.any():
        raise ValueError("the mesh UVs cover no texel of the texture (all UVs outside [0, 1] or degenerate).")
    tri = np.asarray(vertices, np.float64)[np.asarray(faces, np.int64)[face_img[filled]]]   # [T, 3, 3]
    pos = np.einsum("tk,tkc->tc", bary[filled].astype(np.float64), tri).astype(np.float32)
    vals = np.asarray(sample(pos), dtype=np.float32)
    img = np.zeros((int(size), int(size), vals.shape[1]), np.float32)
    img[filled] = vals
    img = fill_empty_texels(img, filled)
    base, mr = pack_pbr_textures(img)
    return base, mr, float(filled.mean())
