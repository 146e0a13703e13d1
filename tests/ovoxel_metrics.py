"""Surface-distance metrics for O-Voxel round trips (tests and benchmarks; needs scipy)."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from backend.ovoxel.meshutil import sample_surface


def closest_point_on_triangles(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Closest points on triangles (a, b, c) to points p (all [n, 3]); Ericson's region method, vectorised."""
    ab = b - a
    ac = c - a
    ap = p - a
    d1 = (ab * ap).sum(1)
    d2 = (ac * ap).sum(1)
    bp = p - b
    d3 = (ab * bp).sum(1)
    d4 = (ac * bp).sum(1)
    cp = p - c
    d5 = (ab * cp).sum(1)
    d6 = (ac * cp).sum(1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    out = np.empty_like(p)
    done = np.zeros(p.shape[0], bool)

    def put(mask, val):
        nonlocal done
        m = mask & ~done
        out[m] = val[m] if val.ndim == 2 else val
        done |= m

    with np.errstate(divide="ignore", invalid="ignore"):
        put((d1 <= 0) & (d2 <= 0), a)
        put((d3 >= 0) & (d4 <= d3), b)
        put((d6 >= 0) & (d5 <= d6), c)
        v = d1 / (d1 - d3)
        put((vc <= 0) & (d1 >= 0) & (d3 <= 0), a + v[:, None] * ab)
        w = d2 / (d2 - d6)
        put((vb <= 0) & (d2 >= 0) & (d6 <= 0), a + w[:, None] * ac)
        w = (d4 - d3) / ((d4 - d3) + (d5 - d6))
        put((va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0), b + w[:, None] * (c - b))
        den = 1.0 / (va + vb + vc)
        v = vb * den
        w = vc * den
        inner = a + ab * v[:, None] + ac * w[:, None]
        inner = np.where(np.isfinite(inner), inner, a)
        put(np.ones(p.shape[0], bool), inner)
    return out


def subdivide_long_triangles(v: np.ndarray, f: np.ndarray, max_edge: float):
    """Split triangles (1 -> 4 at edge midpoints) until no edge is longer than ``max_edge``.

    Returns triangle vertex arrays (a, b, c) [n, 3] of a soup covering exactly the same surface.
    """
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    done = []
    for _ in range(40):
        le = np.maximum(np.maximum(np.linalg.norm(b - a, axis=1), np.linalg.norm(c - b, axis=1)),
                        np.linalg.norm(a - c, axis=1))
        small = le <= max_edge
        done.append((a[small], b[small], c[small]))
        a, b, c = a[~small], b[~small], c[~small]
        if a.shape[0] == 0:
            break
        ab, bc, ca = (a + b) / 2, (b + c) / 2, (c + a) / 2
        a, b, c = (np.concatenate([a, ab, ca, ab]), np.concatenate([ab, b, bc, bc]),
                   np.concatenate([ca, bc, c, ca]))
    done.append((a, b, c))
    return tuple(np.concatenate([d[i] for d in done]) for i in range(3))


class SurfaceDistance:
    """Exact point-to-triangle-mesh distance.

    Long triangles are subdivided (same surface) so that every triangle lies within ``rmax`` of its
    centroid; the k nearest centroids are tested exactly and the result is verified (any triangle
    closer than the found distance has its centroid within found + rmax); unverified points are
    retried with a larger k.
    """

    def __init__(self, vertices, faces, max_edge: float = None):
        v = np.asarray(vertices, np.float64)
        f = np.asarray(faces, np.int64)
        if max_edge is None:
            ext = float((v.max(0) - v.min(0)).max()) if v.shape[0] else 1.0
            max_edge = ext / 256.0
        self.a, self.b, self.c = subdivide_long_triangles(v, f, max_edge)
        cen = (self.a + self.b + self.c) / 3
        self.rmax = float(np.sqrt(np.max([((x - cen) ** 2).sum(1).max() for x in (self.a, self.b, self.c)])))
        self.tree = cKDTree(cen)

    def _best(self, q, idx):
        best = np.full(q.shape[0], np.inf)
        for j in range(idx.shape[1]):
            t = idx[:, j]
            cp = closest_point_on_triangles(q, self.a[t], self.b[t], self.c[t])
            best = np.minimum(best, np.linalg.norm(q - cp, axis=1))
        return best

    def distance(self, p: np.ndarray, chunk: int = 100_000, k: int = 10) -> np.ndarray:
        p = np.asarray(p, np.float64)
        out = np.empty(p.shape[0])
        n = self.a.shape[0]
        k = min(k, n)
        self.unverified = 0
        for s in range(0, p.shape[0], chunk):
            q = p[s:s + chunk]
            dk, idx = self.tree.query(q, k=k)
            idx = idx.reshape(q.shape[0], k)
            dk = dk.reshape(q.shape[0], k)
            best = self._best(q, idx)
            bad = np.flatnonzero(dk[:, -1] < best + self.rmax)
            if bad.shape[0] and k < n:
                k2 = min(4 * k, n)
                dk2, idx2 = self.tree.query(q[bad], k=k2)
                best[bad] = np.minimum(best[bad], self._best(q[bad], idx2.reshape(bad.shape[0], k2)))
                self.unverified += int((dk2.reshape(bad.shape[0], k2)[:, -1] < best[bad] + self.rmax).sum())
            out[s:s + chunk] = best
        return out


def roundtrip_metrics(src_v, src_f, dec_v, dec_f, voxel: float, n: int = 30_000, f1_tau: float = 0.5) -> dict:
    """Chamfer (mean of both directions, point-to-triangle) and F1@tau, in voxel units."""
    a_pts, _ = sample_surface(src_v, src_f, n, seed=2)
    b_pts, _ = sample_surface(dec_v, dec_f, n, seed=3)
    d_ab = SurfaceDistance(dec_v, dec_f, 1.5 * voxel).distance(a_pts) / voxel  # input -> decoded (recall)
    d_ba = SurfaceDistance(src_v, src_f, 1.5 * voxel).distance(b_pts) / voxel  # decoded -> input (precision)
    prec = float((d_ba <= f1_tau).mean())
    rec = float((d_ab <= f1_tau).mean())
    f1 = 2 * prec * rec / max(prec + rec, 1e-12)
    return {"chamfer": float((d_ab.mean() + d_ba.mean()) / 2), "to_decoded_mean": float(d_ab.mean()),
            "to_input_mean": float(d_ba.mean()), "to_decoded_p999": float(np.quantile(d_ab, 0.999)),
            "to_input_p999": float(np.quantile(d_ba, 0.999)), "max": float(max(d_ab.max(), d_ba.max())),
            "precision": prec, "recall": rec, "f1": f1}
