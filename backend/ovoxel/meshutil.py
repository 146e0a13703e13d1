"""Small numpy mesh utilities: topology counts, orientation checks, signed volume, area sampling."""

from __future__ import annotations

import numpy as np


def edge_stats(faces: np.ndarray) -> dict:
    """Edge-use histogram of a triangle mesh.

    Returns ``{"edges", "boundary", "manifold", "nonmanifold", "inconsistent"}``: numbers of unique
    undirected edges used by 1 face (boundary), 2 faces (manifold), >2 faces (non-manifold), and of
    manifold edges whose two faces traverse them in the same direction (orientation conflicts).
    """
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if f.shape[0] == 0:
        return {"edges": 0, "boundary": 0, "manifold": 0, "nonmanifold": 0, "inconsistent": 0}
    a = f.reshape(-1)
    b = f[:, [1, 2, 0]].reshape(-1)
    n = np.int64(max(int(f.max()) + 1, 1))
    und = np.minimum(a, b) * n + np.maximum(a, b)
    fwd = a < b
    order = np.argsort(und, kind="stable")
    su = und[order]
    first = np.concatenate([[True], su[1:] != su[:-1]])
    starts = np.flatnonzero(first)
    counts = np.diff(np.concatenate([starts, [su.shape[0]]]))
    man = starts[counts == 2]
    d0 = fwd[order][man]
    d1 = fwd[order][man + 1]
    return {"edges": int(starts.shape[0]), "boundary": int((counts == 1).sum()),
            "manifold": int((counts == 2).sum()), "nonmanifold": int((counts > 2).sum()),
            "inconsistent": int((d0 == d1).sum())}


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Signed volume (positive for outward-facing closed surfaces)."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if f.shape[0] == 0:
        return 0.0
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def face_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    return 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, seed: int = 0):
    """``n`` area-uniform random points on the surface; returns (points [n, 3], face index [n])."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    area = face_areas(v, f)
    tot = area.sum()
    if f.shape[0] == 0 or tot <= 0:
        return np.zeros((0, 3)), np.zeros(0, np.int64)
    fi = np.searchsorted(np.cumsum(area) / tot, rng.random(n), side="right")
    fi = np.minimum(fi, f.shape[0] - 1)
    r1 = np.sqrt(rng.random(n))
    r2 = rng.random(n)
    a, b, c = v[f[fi, 0]], v[f[fi, 1]], v[f[fi, 2]]
    p = (1 - r1)[:, None] * a + (r1 * (1 - r2))[:, None] * b + (r1 * r2)[:, None] * c
    return p, fi
