"""Procedural test meshes (numpy): UV sphere, torus, box, open cylinder. Used by tests and benchmarks."""

from __future__ import annotations

import numpy as np


def uv_sphere(radius: float = 0.45, n_lat: int = 113, n_lon: int = 446, center=(0.0, 0.0, 0.0)):
    """Closed UV sphere with outward faces; 113 x 446 gives 99,904 triangles (the spec's benchmark sphere)."""
    th = np.linspace(0, np.pi, n_lat + 1)[1:-1]
    ph = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    T, P = np.meshgrid(th, ph, indexing="ij")
    pts = np.stack([np.sin(T) * np.cos(P), np.sin(T) * np.sin(P), np.cos(T)], -1).reshape(-1, 3)
    v = np.concatenate([[[0, 0, 1]], pts, [[0, 0, -1]]]) * radius + np.asarray(center)
    faces = []
    L = n_lon
    ring = lambda r: 1 + r * L + (np.arange(L))  # noqa: E731
    top = ring(0)
    faces.append(np.stack([np.zeros(L, int), top, np.roll(top, -1)], 1))
    for r in range(n_lat - 2):
        a, b = ring(r), ring(r + 1)
        an, bn = np.roll(a, -1), np.roll(b, -1)
        faces.append(np.stack([a, b, bn], 1))
        faces.append(np.stack([a, bn, an], 1))
    last = ring(n_lat - 2)
    sp = v.shape[0] - 1
    faces.append(np.stack([np.full(L, sp), np.roll(last, -1), last], 1))
    return v.astype(np.float32), np.concatenate(faces).astype(np.int32)


def torus(R: float = 0.3, r: float = 0.12, n_u: int = 316, n_v: int = 158):
    u = np.linspace(0, 2 * np.pi, n_u, endpoint=False)
    w = np.linspace(0, 2 * np.pi, n_v, endpoint=False)
    U, W = np.meshgrid(u, w, indexing="ij")
    v = np.stack([(R + r * np.cos(W)) * np.cos(U), (R + r * np.cos(W)) * np.sin(U), r * np.sin(W)], -1).reshape(-1, 3)
    idx = np.arange(n_u * n_v).reshape(n_u, n_v)
    a = idx
    b = np.roll(idx, -1, 0)
    c = np.roll(np.roll(idx, -1, 0), -1, 1)
    d = np.roll(idx, -1, 1)
    f = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return v.astype(np.float32), f.astype(np.int32)


def box(lo=(-0.3, -0.3, -0.3), hi=(0.3, 0.3, 0.3)):
    """Closed axis-aligned box (12 triangles, outward)."""
    lo = np.asarray(lo, float)
    hi = np.asarray(hi, float)
    v = np.array([[lo[0], lo[1], lo[2]], [hi[0], lo[1], lo[2]], [hi[0], hi[1], lo[2]], [lo[0], hi[1], lo[2]],
                  [lo[0], lo[1], hi[2]], [hi[0], lo[1], hi[2]], [hi[0], hi[1], hi[2]], [lo[0], hi[1], hi[2]]])
    f = np.array([[0, 2, 1], [0, 3, 2], [4, 5, 6], [4, 6, 7], [0, 1, 5], [0, 5, 4],
                  [1, 2, 6], [1, 6, 5], [2, 3, 7], [2, 7, 6], [3, 0, 4], [3, 4, 7]])
    return v.astype(np.float32), f.astype(np.int32)


def open_cylinder(radius: float = 0.3, height: float = 0.8, n_around: int = 200, n_h: int = 50):
    ang = np.linspace(0, 2 * np.pi, n_around, endpoint=False)
    z = np.linspace(-height / 2, height / 2, n_h + 1)
    A, Z = np.meshgrid(ang, z, indexing="ij")
    v = np.stack([radius * np.cos(A), radius * np.sin(A), Z], -1).reshape(-1, 3)
    idx = np.arange(n_around * (n_h + 1)).reshape(n_around, n_h + 1)
    a = idx[:, :-1]
    b = np.roll(idx, -1, 0)[:, :-1]
    c = np.roll(idx, -1, 0)[:, 1:]
    d = idx[:, 1:]
    f = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return v.astype(np.float32), f.astype(np.int32)
