"""Small numpy mesh utilities: topology counts, orientation checks, signed volume, area sampling, hole filling."""

from __future__ import annotations

import numpy as np


def _edge_groups(a: np.ndarray, b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-edges ``a[i] → b[i]`` (vertex ids < ``n``) grouped by undirected edge: ``(order, starts,
    counts)`` — ``order`` sorts them by edge, group ``g`` is ``order[starts[g]:starts[g] + counts[g]]``."""
    und = np.minimum(a, b) * np.int64(n) + np.maximum(a, b)
    order = np.argsort(und, kind="stable")
    su = und[order]
    first = np.ones(su.shape[0], bool)
    np.not_equal(su[1:], su[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    return order, starts, np.diff(np.append(starts, su.shape[0]))


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
    order, starts, counts = _edge_groups(a, b, max(int(f.max()) + 1, 1))
    fwd = a < b
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


def fill_small_holes(vertices: np.ndarray, faces: np.ndarray, max_perimeter: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Close every boundary loop shorter than ``max_perimeter`` (the official pipeline's
    ``Mesh.fill_holes(0.03)`` step after decoding, in the same unit-cube units).

    A loop is a connected set of boundary edges (used by one face) whose half-edges form one directed
    cycle (every vertex one in, one out); loops through non-manifold vertices are left open. Each
    filled loop gets one new vertex at the mean of its vertices and a fan of triangles wound against
    the boundary half-edges, so the patch continues the surrounding orientation. Returns
    ``(vertices, faces)`` with the new vertices appended and the new faces after the old ones (the
    inputs themselves when nothing is filled).
    """
    from .decode import _components

    v = np.asarray(vertices)
    f = np.asarray(faces).reshape(-1, 3)
    if f.shape[0] == 0 or max_perimeter <= 0:
        return vertices, faces
    n = int(v.shape[0])
    # Sort-free screening: on an oriented manifold every vertex's out-neighbours equal its
    # in-neighbours, so per-vertex sums of a random hash over both agree (triangle (x, y, z) adds
    # h(y) - h(z) at x, h(z) - h(x) at y, h(x) - h(y) at z); only the faces at vertices where they
    # differ (boundary, non-manifold or misoriented) go through the exact edge count.
    h = np.random.default_rng(0x5EED).random(n) + 1.0
    c0, c1, c2 = f[:, 0], f[:, 1], f[:, 2]
    hx, hy, hz = h[c0], h[c1], h[c2]
    d = np.bincount(c0, hy - hz, minlength=n)
    d += np.bincount(c1, hz - hx, minlength=n)
    d += np.bincount(c2, hx - hy, minlength=n)
    odd = np.abs(d) > 1e-9
    del hx, hy, hz, d
    cand = np.flatnonzero(odd[c0] | odd[c1] | odd[c2])
    if cand.shape[0] == 0:
        return vertices, faces
    fi = f[cand].astype(np.int64)
    a = fi.reshape(-1)
    b = fi[:, [1, 2, 0]].reshape(-1)
    # half-edges at an odd vertex: every face using such an edge touches that vertex, so all of the
    # edge's half-edges are here and the count below is exact
    keep = np.flatnonzero(odd[a] | odd[b])
    a, b = a[keep], b[keep]
    order, starts, counts = _edge_groups(a, b, n)
    bnd = order[starts[counts == 1]]
    if bnd.shape[0] == 0:
        return vertices, faces
    ba, bb = a[bnd], b[bnd]
    ids, inv = np.unique(np.concatenate([ba, bb]), return_inverse=True)
    ia, ib = inv[:ba.shape[0]], inv[ba.shape[0]:]
    k = ids.shape[0]
    _, lab = np.unique(_components(k, ia, ib), return_inverse=True)
    nl = int(lab.max()) + 1
    e_lab = lab[ia]
    pos = v[ids].astype(np.float64)
    perim = np.bincount(e_lab, np.linalg.norm(pos[ia] - pos[ib], axis=1), minlength=nl)
    n_edges = np.bincount(e_lab, minlength=nl)
    n_verts = np.bincount(lab, minlength=nl)
    deg_ok = (np.bincount(ia, minlength=k) == 1) & (np.bincount(ib, minlength=k) == 1)
    simple = np.bincount(lab, ~deg_ok, minlength=nl) == 0
    fill = (perim < max_perimeter) & simple & (n_edges == n_verts) & (n_edges >= 3)
    if not fill.any():
        return vertices, faces
    centre = np.stack([np.bincount(lab, pos[:, i], minlength=nl) for i in range(3)], 1) / n_verts[:, None]
    loops = np.flatnonzero(fill)
    new_id = np.full(nl, -1, np.int64)
    new_id[loops] = n + np.arange(loops.shape[0])
    sel = fill[e_lab]
    tri = np.stack([bb[sel], ba[sel], new_id[e_lab[sel]]], 1)
    return (np.concatenate([v, centre[loops].astype(v.dtype)]),
            np.concatenate([f, tri.astype(f.dtype)]))
