"""Brute-force (loop) reference of the official mesh -> flexible-dual-grid encoder, for small tests.

Follows spec ovoxel.md §1.2-1.3 literally, per grid edge / per voxel, with no vectorisation tricks:
edge crossings by point-in-triangle on every interior grid line, the face term by a separating-axis
triangle/box test on every active voxel, the boundary term by segment/box overlap, and the same
box-constrained QEF solve. Geometry is shifted by the encoder's fixed lattice offset so both see the
same (tie-free) configuration.
"""

from __future__ import annotations

import itertools

import numpy as np

from backend.ovoxel import encode as E


def _tri_box_overlap(tri: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> bool:
    c = (lo + hi) / 2
    h = (hi - lo) / 2
    v = tri - c
    e = [v[1] - v[0], v[2] - v[1], v[0] - v[2]]
    axes = [np.eye(3)[i] for i in range(3)]
    axes.append(np.cross(e[0], e[1]))
    for i in range(3):
        for j in range(3):
            axes.append(np.cross(np.eye(3)[i], e[j]))
    for ax in axes:
        if not np.any(ax):
            continue
        p = v @ ax
        r = np.abs(ax) @ h
        if p.min() > r or p.max() < -r:
            return False
    return True


def _seg_box_overlap(p0, p1, lo, hi) -> bool:
    d = p1 - p0
    t0, t1 = 0.0, 1.0
    for a in range(3):
        if d[a] == 0:
            if p0[a] < lo[a] or p0[a] > hi[a]:
                return False
            continue
        ta = (lo[a] - p0[a]) / d[a]
        tb = (hi[a] - p0[a]) / d[a]
        t0 = max(t0, min(ta, tb))
        t1 = min(t1, max(ta, tb))
        if t0 > t1:
            return False
    return True


def reference_encode(vertices, faces, R, face_weight=1.0, boundary_weight=0.2, regularization_weight=1e-2):
    v, f, _ = E.prepare_mesh(vertices, faces)
    box = np.array([[-0.5] * 3, [0.5] * 3])
    s = (box[1] - box[0]) / R
    P = (v - box[0]) / s + E._SHIFT
    crossings = []  # (tri, axis, owner voxel, point)
    for ti, tri in enumerate(f):
        V = P[tri]
        for a in range(3):
            b, c = (a + 1) % 3, (a + 2) % 3
            A, B, C = V[0], V[1], V[2]
            D = (B[b] - A[b]) * (C[c] - A[c]) - (B[c] - A[c]) * (C[b] - A[b])
            if D == 0:
                continue
            n = np.cross(B - A, C - A)
            for j in range(1, R):
                for k in range(1, R):
                    w = []
                    for (p, q) in ((A, B), (B, C), (C, A)):
                        w.append((q[b] - p[b]) * (k - p[c]) - (q[c] - p[c]) * (j - p[b]))
                    w = np.array(w) * np.sign(D)
                    if (w > 0).all():
                        t = A[a] - (n[b] * (j - A[b]) + n[c] * (k - A[c])) / n[a]
                        i = int(np.floor(t))
                        if 0 <= i < R:
                            own = [0, 0, 0]
                            own[a], own[b], own[c] = i, j - 1, k - 1
                            pt = np.zeros(3)
                            pt[a], pt[b], pt[c] = t, j, k
                            crossings.append((ti, a, tuple(own), pt))
    vox = {}
    for ti, a, own, pt in crossings:
        b, c = (a + 1) % 3, (a + 2) % 3
        for db in (0, 1):
            for dc in (0, 1):
                vv = list(own)
                vv[b] += db
                vv[c] += dc
                vox.setdefault(tuple(vv), {"Q": np.zeros((4, 4)), "sum": np.zeros(3), "cnt": 0, "flags": [0, 0, 0]})
    # plane quadrics
    qT = []
    for tri in f:
        V = P[tri]
        n = np.cross(V[1] - V[0], V[2] - V[1])
        ln = np.linalg.norm(n)
        n = n / ln if ln > 0 else n
        p = np.append(n, -n @ V[0])
        qT.append(np.outer(p, p))
    for ti, a, own, pt in crossings:
        b, c = (a + 1) % 3, (a + 2) % 3
        vox[own]["flags"][a] = 1
        for db in (0, 1):
            for dc in (0, 1):
                vv = list(own)
                vv[b] += db
                vv[c] += dc
                d = vox[tuple(vv)]
                d["Q"] += qT[ti]
                d["sum"] += pt
                d["cnt"] += 1
    if face_weight > 0:
        for key, d in vox.items():
            lo = np.array(key, float)
            for ti, tri in enumerate(f):
                V = P[tri]
                if (V.max(0) < lo).any() or (V.min(0) > lo + 1).any():
                    continue
                if _tri_box_overlap(V, lo, lo + 1):
                    d["Q"] += qT[ti]
    if boundary_weight > 0:
        edges = {}
        for tri in f:
            for e0, e1 in ((tri[0], tri[1]), (tri[1], tri[2]), (tri[2], tri[0])):
                k = (min(e0, e1), max(e0, e1))
                edges[k] = edges.get(k, 0) + 1
        for (e0, e1), cnt in edges.items():
            if cnt != 1:
                continue
            p0, p1 = P[e0], P[e1]
            dvec = (p1 - p0) / np.linalg.norm(p1 - p0)
            A = np.eye(3) - np.outer(dvec, dvec)
            L = np.zeros((4, 4))
            L[:3, :3] = A
            L[:3, 3] = L[3, :3] = -A @ p0
            L[3, 3] = p0 @ A @ p0
            for key, d in vox.items():
                lo = np.array(key, float)
                if _seg_box_overlap(p0, p1, lo, lo + 1):
                    d["Q"] += boundary_weight * L
    out = {}
    for key, d in vox.items():
        Q = d["Q"].copy()
        m = d["sum"] / d["cnt"]
        lam = regularization_weight * d["cnt"]
        Q[:3, :3] += lam * np.eye(3)
        Q[:3, 3] -= lam * m
        Q[3, :3] -= lam * m
        Q[3, 3] += lam * m @ m
        q10 = np.array([Q[0, 0], Q[0, 1], Q[0, 2], Q[1, 1], Q[1, 2], Q[2, 2], Q[0, 3], Q[1, 3], Q[2, 3], Q[3, 3]])
        lo = np.array(key, float)
        x, _ = E._solve_qef(q10[:, None], lo[None], lo[None] + 1)
        out[key] = (x[0] - lo, tuple(d["flags"]), q10)
    return out


def random_mesh(n_tris=12, seed=0, scale=0.4):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-scale, scale, (n_tris, 3))
    v = (centers[:, None, :] + rng.normal(0, 0.12, (n_tris, 3, 3))).reshape(-1, 3)
    v = np.clip(v, -0.49, 0.49)
    f = np.arange(n_tris * 3).reshape(-1, 3)
    # share some vertices so there are interior (2-face) edges as well as boundary edges
    f2 = np.stack([f[:-1, 1], f[:-1, 0], f[1:, 2]], 1)
    return v.astype(np.float32), np.concatenate([f, f2]).astype(np.int32)


__all__ = ["reference_encode", "random_mesh", "itertools"]
